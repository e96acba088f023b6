"""What egress forwarding costs: added time per forwarded connection, and relay throughput.

Run as root: ``.venv/bin/python bench/egress.py [CONNECTIONS] [MIB] [ROUNDS]`` (defaults 300,
256, 3). Nothing leaves the machine: the "internet" is the egress lab of the tests
(``tests/helpers/egress.py``: a network namespace joined to the host's by a veth pair), with
a small HTTP server in it that answers ``GET /bytes/N`` with N bytes as fast as Python's
``sendall`` of a 1 MiB buffer goes.

The same client script runs twice per round, alternating:

* **direct**: on the host, connecting to the lab's address, as any program would;
* **relayed**: as nobody in a sandbox-like network namespace with the recorder installed
  and configured with a grant of the lab's name (``tests.helpers.egress.run_sandboxed``,
  the supervisor's own code path: TPROXY to the recorder, which opens the upstream
  connection from the host's namespace, checks the first message and relays both ways).

Per connection it measures ``connect()`` alone and the time to the whole answer of a small
request (connect, ``GET /bytes/100``, read until the server closes); then, on one
connection per run, the throughput of ``GET /bytes/MIB MiB``. The name is resolved once
before the loop (the sandbox's DNS answer is a placeholder; the relay resolves the real
name once per run), so the figures are per connection. Printed: p50/p99 of each, the
added time (relayed minus direct), and MB/s of each run.

Then, in one sandbox-like run with a grant (so refusals are resets), the time from
``connect()`` to the client's error for a host no grant covers (``blocked``): a plain TCP
client that sends first (an HTTP request, then ``recv``), a TLS client (the handshake), and
a client that waits for the server to speak first; BLOCKED times each.

Last, ``pip install`` of one small wheel from pypiserver (the tests' package index, over
HTTPS in the lab) into a fresh ``--target``, ROUNDS x 2 times each, alternating: **bare**, on
the host (the name comes from a private ``/etc/hosts`` bound in a mount namespace of its
own); **dry run**, the same command through a real daemon's Validate whose policy grants
the index (the shipped default policy plus the grant; ``--test-resolve``), timed from the
client (whole Validate) and by the daemon (the command alone); and **dry run, no grant**,
the same without the grant (pip's default 5 retries with backoff), twice.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from airlock.egress import EgressPolicy, EgressRule
from airlock.policy.store import default_policy_dir
from airlock.sandbox.netcap import NetcapLimits
from bench._stats import summarize
from tests.daemon.test_egress_pip import wheel_bytes
from tests.helpers import TEST_LIMITS, public_dir, running_daemon
from tests.helpers.egress import Lab, egress_lab, package_index, run_sandboxed

PORT = 9080

BLAST = r"""
import socket, sys, threading
payload = memoryview(b"x" * (1 << 20))
def serve(conn):
    with conn:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        n = int(head.split(b" ", 2)[1].rsplit(b"/", 1)[1])
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        first = min(n, 65536)  # the head and the first bytes in one write
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % n
                     + payload[:first])
        n -= first
        while n > 0:
            conn.sendall(payload[: min(n, len(payload))])
            n -= min(n, len(payload))
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=512)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

CLIENT = r"""
import json, socket, time
host, port, connections, mib = HOST, PORT, CONNECTIONS, MIB
address = socket.gethostbyname(host)
def fetch(n):
    s = socket.create_connection((address, port), timeout=30)
    t1 = time.perf_counter()
    head = b"GET /bytes/%d HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
    s.sendall(head % (n, host.encode()))
    got = 0
    while chunk := s.recv(1 << 20):
        got += len(chunk)
    s.close()
    return t1, got
connect, whole = [], []
for _ in range(connections):
    t0 = time.perf_counter()
    t1, got = fetch(100)
    connect.append(t1 - t0)
    whole.append(time.perf_counter() - t0)
t0 = time.perf_counter()
_, got = fetch(mib << 20)
seconds = time.perf_counter() - t0
print(json.dumps({"connect": connect, "whole": whole, "bytes": got, "seconds": seconds}))
"""


BLOCKED = 200

BLOCKED_CLIENT = r"""
import json, socket, ssl, time
ctx = ssl.create_default_context()
address = socket.gethostbyname("blocked.test")  # a placeholder: no grant covers the name
def attempt(port, kind):
    t0 = time.perf_counter()
    s = socket.create_connection((address, port), timeout=10)
    try:
        if kind == "tls":
            ctx.wrap_socket(s, server_hostname="blocked.test")
        else:
            if kind == "tcp":
                s.sendall(b"GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n")
            if s.recv(10):
                raise SystemExit("the blocked host answered")
    except (ConnectionResetError, ssl.SSLError):
        pass
    finally:
        s.close()
    return time.perf_counter() - t0
out = {kind: [attempt(port, kind) for _ in range(N)]
       for kind, port in (("tcp", 80), ("tls", 443), ("waiting", 80))}
print(json.dumps(out))
"""

PIP_GRANT = """\
version: 1
egress:
  dry_run:
    allow:
      - {{name: index, hosts: [pypi.test], ports: [8443], cidrs: [{cidr}]}}
"""


def blocked(egress: EgressPolicy, lab: Lab) -> dict[str, object]:
    """connect() to the client's error for a host without a grant, per kind of client."""
    out = run_sandboxed(
        BLOCKED_CLIENT.replace("N", str(BLOCKED)), egress, {"pkg.test": (lab.address,)}
    )
    assert out.status == 0, out.output
    times = json.loads(out.output.splitlines()[-1])
    refused = [a for a in out.tcp() if a.refusal == "no-grant" and not a.forwarded]
    assert len(refused) == 3 * BLOCKED, "not every blocked attempt was recorded as refused"
    return {kind: summarize(seconds) for kind, seconds in times.items()}


def pip_install(base: Path, lab: Lab, rounds: int) -> dict[str, object]:
    """pip install of one small wheel from pypiserver: bare vs dry run (granted, not)."""
    packages = base / "packages"
    packages.mkdir()
    name, data = wheel_bytes("airlock-demo-hello", "1.0", {"hello/__init__.py": "X = 1\n"})
    (packages / name).write_bytes(data)
    hosts = base / "hosts"
    hosts.write_text(Path("/etc/hosts").read_text() + f"\n{lab.address} pypi.test\n")
    policies = {}
    for label, grant in (("granted", True), ("blocked", False)):
        policy = base / f"policy-{label}"
        shutil.copytree(default_policy_dir(), policy / "default")
        if grant:
            (policy / "index.yaml").write_text(PIP_GRANT.format(cidr=lab.cidr))
        policies[label] = policy
    ws = base / "ws"
    ws.mkdir()
    ws.chmod(0o777)

    def command(target: str) -> str:
        return (
            f"{sys.executable} -m pip --disable-pip-version-check --no-input install"
            f" --no-cache-dir --cert {lab.ca} --index-url https://pypi.test:8443/simple/"
            f" --target {target} airlock-demo-hello"
        )

    env = {"PIP_CONFIG_FILE": os.devnull, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    bare: list[float] = []
    dry: list[float] = []
    dry_command: list[float] = []
    no_grant: list[float] = []
    args = lab.resolve_args()
    with (
        package_index(lab, packages),
        running_daemon(base / "d1", *TEST_LIMITS, "--policy-dir", str(policies["granted"]),
                       *args) as granted,
        granted.client() as client,
    ):  # fmt: skip
        for i in range(2 * rounds + 1):  # the first of each is a warm-up, not counted
            target = tempfile.mkdtemp(dir=ws)
            script = f"mount --bind {hosts} /etc/hosts && exec {command(target)}"
            t0 = time.perf_counter()
            subprocess.run(
                ["unshare", "--mount", "--", "sh", "-c", script],
                check=True, capture_output=True, env=env,
            )  # fmt: skip
            if i:
                bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            v = client.validate(command("site"), cwd=str(ws), env=env, timeout=60)
            assert v.exit_code == 0, v.stderr
            assert all(a.forwarded for a in v.network_attempts if a.port == 8443)
            if i:
                dry.append(time.perf_counter() - t0)
                dry_command.append(v.timings.command_s)
    with (
        package_index(lab, packages),
        running_daemon(base / "d2", *TEST_LIMITS, "--policy-dir", str(policies["blocked"]),
                       *args) as ungranted,
        ungranted.client() as client,
    ):  # fmt: skip
        for _ in range(2):
            t0 = time.perf_counter()
            v = client.validate(command("site"), cwd=str(ws), env=env, timeout=60)
            assert v.exit_code != 0 and v.signal == 0, v.stdout
            no_grant.append(time.perf_counter() - t0)
    return {
        "bare_ms": summarize(bare),
        "dry_run_ms": summarize(dry),
        "dry_run_command_ms": summarize(dry_command),
        "dry_run_no_grant_ms": summarize(no_grant),
    }


def client(host: str, connections: int, mib: int) -> str:
    return (
        CLIENT.replace("HOST", repr(host))
        .replace("PORT", str(PORT))
        .replace("CONNECTIONS", str(connections))
        .replace("MIB", str(mib))
    )


def main() -> int:
    connections = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    mib = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    with public_dir() as base, egress_lab(base, names=("pkg.test", "pypi.test")) as lab:
        blast = subprocess.Popen(
            ["nsenter", "-t", str(lab.pid), "-n", "--", sys.executable, "-c", BLAST, str(PORT)],
            stdout=subprocess.PIPE,
        )
        try:
            assert blast.stdout is not None and blast.stdout.readline() == b"ready\n"
            egress = EgressPolicy(
                allow=(
                    EgressRule(
                        hosts=("pkg.test",), ports=((PORT, PORT),), cidrs=(lab.cidr,), label="b"
                    ),
                )
            )
            # More connections in one run than a dry run forwards by default (256).
            limits = NetcapLimits(forwarded_connections=connections + 1)
            runs: dict[str, list[dict[str, object]]] = {"direct": [], "relayed": []}
            for _ in range(rounds):
                direct = subprocess.run(
                    [sys.executable, "-c", client(lab.address, connections, mib)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                runs["direct"].append(json.loads(direct.stdout))
                relayed = run_sandboxed(
                    client("pkg.test", connections, mib),
                    egress,
                    {"pkg.test": (lab.address,)},
                    limits=limits,
                )
                assert relayed.status == 0, relayed.output
                runs["relayed"].append(json.loads(relayed.output.splitlines()[-1]))
                forwarded = [a for a in relayed.tcp() if a.forwarded and not a.refusal]
                assert len(forwarded) == connections + 1, "not every connection was forwarded"
            blocked_ms = blocked(egress, lab)
        finally:
            blast.kill()
            blast.wait()
        pip = pip_install(base, lab, rounds)
    report: dict[str, object] = {"connections": connections, "mib": mib, "rounds": rounds}
    for mode, results in runs.items():
        connect = [t for r in results for t in r["connect"]]  # type: ignore[attr-defined]
        whole = [t for r in results for t in r["whole"]]  # type: ignore[attr-defined]
        speeds = [round(int(str(r["bytes"])) / float(str(r["seconds"])) / 1e6) for r in results]
        report[mode] = {
            "connect_ms": summarize(connect),
            "request_ms": summarize(whole),
            "throughput_MBps": speeds,
        }
    d, r = report["direct"], report["relayed"]
    assert isinstance(d, dict) and isinstance(r, dict)
    report["added_ms"] = {
        k: round(r["request_ms"][k] - d["request_ms"][k], 3) for k in ("p50", "p99")
    }
    report["blocked_connect_to_error_ms"] = blocked_ms
    report["pip_install"] = pip
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
