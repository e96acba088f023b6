"""Who a caller is, and how many connections it may hold: attacked as a real non-root user.

- B: the identity (uid, gid, supplementary groups) is the one the kernel reported when the
  connection was accepted; credentials a process takes on afterwards (as a process that got the
  caller's pid would have) never reach a dry run.
- E: one non-root user cannot lock everyone out with idle connections: a limit per uid, a reserve
  for root, a timeout for connections that never send a request, and a refusal that says why.
"""

from __future__ import annotations

import contextlib
import grp
import json
import socket
import subprocess
import sys
from collections.abc import Iterator

from airlock.client import Client
from tests.helpers import NOBODY, SANDBOX_ARGS, Daemon, public_dir, running_daemon

SHADOW = grp.getgrnam("shadow").gr_gid if "shadow" in {g.gr_name for g in grp.getgrall()} else 42


def test_groups_are_the_ones_at_connect_not_the_pids_now(daemon: Daemon) -> None:
    """A caller connects with no supplementary group; the process holding that pid then gains
    `shadow`. Its next dry run on the same connection still runs without `shadow`."""
    script = f"""
import json, os
import grpc, grpc._channel, grpc._interceptor, grpc._utilities
import grpc_status.rpc_status, google.rpc.error_details_pb2, encodings.idna
from airlock.client import Client
# uid 65534, but keep root as the saved uid so that the groups can change after connect.
os.setgroups([]); os.setresgid({NOBODY}, {NOBODY}, 0); os.setresuid({NOBODY}, {NOBODY}, 0)
with Client({daemon.socket!r}) as c:
    c.health()  # the connection is made now: its credentials are taken now
    os.seteuid(0); os.setgroups([{SHADOW}]); os.seteuid({NOBODY})
    with open("/proc/self/status") as f:
        now = [line.split()[1:] for line in f if line.startswith("Groups:")][0]
    v = c.validate("id -u; id -G; touch ran", cwd="/tmp")  # a write: a real dry run
    print(json.dumps({{"now": now, "ran": v.stdout.decode().split("\\n")}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd="/", timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["now"] == [str(SHADOW)]  # the pid's groups really changed...
    uid, groups = out["ran"][:2]
    assert uid == str(NOBODY)
    assert groups.split() == [str(NOBODY)]  # ...and the dry run did not get them


@contextlib.contextmanager
def limited_daemon(*args: str) -> Iterator[Daemon]:
    with public_dir() as base, running_daemon(base, *SANDBOX_ARGS, *args) as d:
        yield d


# What an HTTP/2 client sends first: the preface and an empty SETTINGS frame. A connection that
# sent it counts as talking (it is not closed as silent) and holds its place.
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _nobody_holds(daemon: Daemon, count: int) -> subprocess.Popen[str]:
    """A uid-65534 process that holds ``count`` open connections, prints `ready`, then makes a
    call on one more connection and prints how it went."""
    script = f"""
import os, socket, sys
import grpc, grpc._channel, grpc._interceptor, grpc._utilities
import grpc_status.rpc_status, google.rpc.error_details_pb2, encodings.idna
from airlock import AirlockError
from airlock.client import Client
os.setgroups([]); os.setresgid({NOBODY}, {NOBODY}, {NOBODY})
os.setresuid({NOBODY}, {NOBODY}, {NOBODY})
held = []
for _ in range({count}):
    s = socket.socket(socket.AF_UNIX)
    s.connect({daemon.socket!r})
    s.sendall({_PREFACE!r})
    held.append(s)
print("ready", flush=True)
sys.stdin.readline()
with Client({daemon.socket!r}) as extra:
    try:
        extra.health()
        print("served", flush=True)
    except AirlockError as e:
        print(type(e).__name__, e.reason, e.message, flush=True)
sys.stdin.readline()
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr
    return proc


def _one_more(proc: subprocess.Popen[str]) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def _finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


def test_one_user_cannot_hold_more_than_its_share() -> None:
    with limited_daemon("--max-connections-per-uid", "3") as d:
        holder = _nobody_holds(d, 3)
        try:
            answer = _one_more(holder)
            assert answer.startswith("ResourceExhausted TOO_MANY_CONNECTIONS"), answer
            assert f"uid {NOBODY} already has 3 connections open" in answer
            with Client(d.socket) as root:  # another user (here root) is served meanwhile
                assert root.health()
        finally:
            _finish(holder)
        # Its connections closed, the same user is served again.
        again = _nobody_holds(d, 3)
        _finish(again)


def test_root_keeps_a_reserve_no_one_else_can_take() -> None:
    # 16 connections in all, the last 2 (an eighth) kept for root.
    with limited_daemon("--max-connections", "16", "--max-connections-per-uid", "16") as d:
        holder = _nobody_holds(d, 14)
        try:
            answer = _one_more(holder)
            assert answer.startswith("ResourceExhausted TOO_MANY_CONNECTIONS"), answer
            assert "kept for root" in answer
            with Client(d.socket) as root, Client(d.socket) as root_too:
                assert root.health() and root_too.health()  # both fit in root's reserve
        finally:
            _finish(holder)


def _hung_up(s: socket.socket) -> None:
    s.settimeout(15)  # far beyond the daemon's 1 s: a hang here is the failure
    while s.recv(4096):  # the server's own preface, then the end: it hung up
        pass


def test_a_connection_that_makes_no_call_is_closed() -> None:
    with limited_daemon("--first-request-timeout", "1") as d:
        with socket.socket(socket.AF_UNIX) as silent:  # sends nothing
            silent.connect(d.socket)
            _hung_up(silent)
        with socket.socket(socket.AF_UNIX) as talker:  # a preface and settings, never a call
            talker.connect(d.socket)
            talker.sendall(_PREFACE)
            _hung_up(talker)
        with socket.socket(socket.AF_UNIX) as drip:  # a byte at a time, to look alive
            drip.connect(d.socket)
            drip.settimeout(0.3)
            closed = False
            for byte in _PREFACE * 4:
                try:
                    drip.sendall(bytes([byte]))
                    while drip.recv(4096):
                        pass
                    closed = True  # recv returned b"": the daemon hung up
                    break
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
            assert closed, "a connection dripping bytes was kept open"
        with Client(d.socket) as c:  # and a caller that talks is served as usual
            assert c.health()
