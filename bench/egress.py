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
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from airlock.egress import EgressPolicy, EgressRule
from bench._stats import summarize
from tests.helpers import public_dir
from tests.helpers.egress import egress_lab, run_sandboxed

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
    with public_dir() as base, egress_lab(base, names=("pkg.test",)) as lab:
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
                    client("pkg.test", connections, mib), egress, {"pkg.test": (lab.address,)}
                )
                assert relayed.status == 0, relayed.output
                runs["relayed"].append(json.loads(relayed.output.splitlines()[-1]))
                forwarded = [a for a in relayed.tcp() if a.forwarded and not a.refusal]
                assert len(forwarded) == connections + 1, "not every connection was forwarded"
        finally:
            blast.kill()
            blast.wait()
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
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
