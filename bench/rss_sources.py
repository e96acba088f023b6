"""Where a daemon's RSS goes over many dry runs: SQLite's memory, malloc, the mappings.

``.venv/bin/python bench/rss_sources.py [CALLS] [KIND]`` (as root; needs ``gdb``): starts its
own daemon (the tests' small limits) in a temporary directory, makes ``CALLS`` dry runs of one
``KIND`` (``write``: a workspace write, the default; ``ro``: a read-only line; ``big``: a 127 KiB
line; ``deny``) from 4 clients, and prints RSS by kind of mapping every tenth of the run. Before
and after, it attaches gdb to the daemon to read ``sqlite3_memory_used()`` and its high-water
mark, and the RSS before and after ``malloc_trim(0)`` (``malloc_stats()`` goes to the daemon's
log, printed at the end). This is how the soak's RSS growth was traced to SQLite's page caches
(docs/threat-model.md, "Reliability"; ``airlock/_sqlite.py`` ``CACHE_KIB``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import TEST_LIMITS, running_daemon

COMMANDS: dict[str, Callable[[int], str]] = {
    "write": lambda i: f"echo {i} > out-{i}.txt && cat out-{i}.txt",
    "ro": lambda i: "ls /etc && cat /etc/hostname",
    "big": lambda i: "echo " + "x" * (127 * 1024),
    "deny": lambda i: "sudo reboot",
}


def mappings(pid: int) -> dict[str, int]:
    """RSS (KiB) by kind of mapping: heap, anonymous (by size), files (by name)."""
    found: dict[str, int] = {}
    current = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split()
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                name = parts[5] if len(parts) > 5 else ""
                if not name:
                    name = "anon >= 1 MiB" if hi - lo >= 1 << 20 else "anon < 1 MiB"
                elif name.startswith("/"):
                    name = "file " + os.path.basename(name)
                current = name
            elif line.startswith("Rss:"):
                found[current] = found.get(current, 0) + int(line.split()[1])
    return found


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def gdb_probe(pid: int, tag: str) -> None:
    out = subprocess.run(
        ["gdb", "-p", str(pid), "-batch",
         "-ex", "print (long)sqlite3_memory_used()",
         "-ex", "print (long)sqlite3_memory_highwater(0)",
         "-ex", "call (void)malloc_stats()"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    values = [line.split("=", 1)[1].strip() for line in out.splitlines() if line.startswith("$")]
    before = rss_kib(pid)
    subprocess.run(
        ["gdb", "-p", str(pid), "-batch", "-ex", "call (int)malloc_trim(0)"],
        capture_output=True, check=False,
    )  # fmt: skip
    print(
        f"{tag}: sqlite3_memory_used {values[:1]} highwater {values[1:2]}; "
        f"RSS {before} KiB, after malloc_trim {rss_kib(pid)} KiB",
        flush=True,
    )


def main() -> int:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    kind = sys.argv[2] if len(sys.argv) > 2 else "write"
    command = COMMANDS[kind]
    with tempfile.TemporaryDirectory(prefix="airlock-rss-") as tmp:
        base = Path(tmp)
        os.chmod(base, 0o755)
        ws = base / "ws"
        ws.mkdir()
        os.chmod(ws, 0o777)
        with running_daemon(base / "d", *TEST_LIMITS, "--max-concurrent", "8") as d:
            pid = d.proc.pid
            for i in range(20):  # the pool and the caches as they will stay
                with d.client() as c:
                    c.validate(command(i), cwd=str(ws))
            start = mappings(pid)
            gdb_probe(pid, "start")
            lock, done, samples = threading.Lock(), [0], []

            def client(worker: int, n: int) -> None:
                with d.client() as c:
                    c.timeout = 120
                    for k in range(n):
                        c.validate(command(k * 4 + worker), cwd=str(ws))
                        with lock:
                            done[0] += 1
                            if done[0] % max(1, calls // 10) == 0:
                                samples.append(mappings(pid))

            threads = [threading.Thread(target=client, args=(w, calls // 4)) for w in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            gdb_probe(pid, "end")
            last = samples[-1] if samples else start
            print("total KiB", sum(start.values()), "->", [sum(s.values()) for s in samples])
            grown = sorted(set(start) | set(last), key=lambda k: start.get(k, 0) - last.get(k, 0))
            for name in grown[:6]:
                print(f"  {name:32s} {start.get(name, 0):7d} ->", [s.get(name, 0) for s in samples])
            print("daemon log (malloc_stats):")
            print("\n".join(line for line in d.log().splitlines() if not line.startswith("{")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
