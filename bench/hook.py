"""``airlock hook``'s start-up: the cost an agent pays before every shell command.

Run alone (``.venv/bin/python bench/hook.py [--runs N]``, as root) or from ``bench/run.py``
(section 11). Starts its own daemon (the shipped default policy, so ``ls`` takes the read-only
fast path and never reaches a sandbox) in a temporary directory and removes it.

Each series is a fresh process, timed from spawn to exit as an agent sees it, with the
same interpreter as the ``airlock`` script. The series are interleaved run by run (A B C
A B C ...), so that load from elsewhere on the machine falls on all of them alike:

* ``python -c pass``: the floor, bare interpreter start-up (``site`` included);
* ``airlock hook claude`` with a Claude Code ``PreToolUse`` JSON for ``ls`` on stdin: end
  to end, the figure the target is about (p50 <= 100 ms);
* the same hook with its call made the way it was before airlock.cli._h2call: through grpc
  and the generated stub (``OLD_PATH`` below, the adapter's own parsing and answer around a
  ``SandboxServiceStub.Validate``), so the two can be compared in one run;
* what the hook cannot do without, each as ``python -c``: ``import grpc`` (what the h2 path
  saves); ``import airlock.cli.hook`` (the adapter, h2 and the hand-written wire codec
  airlock.cli._hookwire: the hook's whole import cost); and the same plus the generated
  messages (protobuf, what the hook imported before _hookwire).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _stats import format_table, ms, summarize

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
AIRLOCKD = str(BIN / "airlockd")
AIRLOCK = str(BIN / "airlock")
TARGET_P50_MS = 100.0


# The hook as it was before airlock.cli._h2call: the same adapter, the call through grpc.
OLD_PATH = """
import os, sys
from airlock.cli import hook
import grpc
from airlock.v1 import sandbox_pb2 as pb, sandbox_pb2_grpc as pb_grpc
req = hook.parse_request("claude", sys.stdin.read())
msg = pb.ValidateRequest(command=req.command, cwd=req.cwd, env=dict(os.environ),
                         session_id=req.session_id)
with grpc.insecure_channel("unix:" + os.environ["AIRLOCK_SOCKET"]) as channel:
    r = pb_grpc.SandboxServiceStub(channel).Validate(msg, timeout=45)
v = hook.Judgement(validation_id=r.validation_id, verdict=hook.Verdict(r.verdict),
                   summary=r.summary, findings=())
sys.stdout.write(hook.answer_verdict("claude", v).stdout)
"""


def _series(workspace: str) -> dict[str, tuple[list[str], bytes]]:
    hook_input = {
        "session_id": "bench",
        "transcript_path": "/dev/null",
        "cwd": workspace,
        "permission_mode": "default",
        "hook_event_name": "PreToolUse",
        "tool_name": "Bash",
        "tool_input": {"command": "ls", "description": "List files"},
    }
    py = sys.executable
    return {
        "python -c pass": ([py, "-c", "pass"], b""),
        "airlock hook claude (ls)": ([AIRLOCK, "hook", "claude"], json.dumps(hook_input).encode()),
        "old path: the call via grpc (ls)": ([py, "-c", OLD_PATH], json.dumps(hook_input).encode()),
        "python -c 'import grpc'": ([py, "-c", "import grpc"], b""),
        "import airlock.cli.hook": ([py, "-c", "import airlock.cli.hook"], b""),
        "import airlock.cli.hook + messages": (
            [py, "-c", "import airlock.cli.hook; import airlock.v1.sandbox_pb2"],
            b"",
        ),
    }


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _once(argv: list[str], stdin: bytes, env: dict[str, str]) -> tuple[float, float, bytes]:
    """Wall-clock and CPU (user + system) seconds of one run, and its stdout."""
    c0 = _cpu()
    t0 = time.perf_counter()
    p = subprocess.run(argv, input=stdin, capture_output=True, env=env, check=False)
    elapsed = time.perf_counter() - t0
    cpu = _cpu() - c0
    if p.returncode != 0:
        raise RuntimeError(f"{argv} exited {p.returncode}: {p.stderr.decode(errors='replace')}")
    return elapsed, cpu, p.stdout


def _import_count(env: dict[str, str], stdin: bytes) -> dict[str, Any]:
    """Which modules the hook imports (``-X importtime``): none of rich, tree-sitter, policy,
    grpc, protobuf."""
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import sys; from airlock.cli.main import main;"
         " sys.exit(main(['hook', 'claude']))"],
        input=stdin, capture_output=True, env=env, check=False,
    )  # fmt: skip
    names = [
        line.split("|")[-1].strip()
        for line in p.stderr.decode().splitlines()
        if line.startswith("import time:") and "|" in line and "imported package" not in line
    ][1:]
    heavy = sorted(
        {
            n.split(".")[0] if not n.startswith("airlock.") else ".".join(n.split(".")[:2])
            for n in names
            if n.startswith(("rich", "tree_sitter", "airlock.policy", "airlock.audit", "mcp"))
            or n == "grpc"
            or n.startswith(("grpc.", "airlock.v1.sandbox_pb2_grpc"))
            or n.startswith(("airlock.api.convert", "airlock.client", "yaml", "jsonschema"))
            or n.startswith(("google.protobuf", "airlock.v1."))
        }
    )
    return {"modules": len(names), "unwanted": heavy}


def measure(runs: int = 30, warmup: int = 3, socket: str | None = None) -> dict[str, Any]:
    """The series against a daemon of its own, or the one already serving at ``socket``."""
    base = Path(tempfile.mkdtemp(prefix="airlock-bench-hook-"))
    os.chmod(base, 0o755)
    ws = base / "ws"
    ws.mkdir()
    sock = socket or str(base / "airlock.sock")
    log = open(base / "daemon.log", "wb")  # noqa: SIM115
    argv = [AIRLOCKD, "--config", os.devnull, "--socket", sock, "--state-dir", str(base / "state")]
    proc = subprocess.Popen(["true"] if socket else argv, stdout=log, stderr=log)
    env = {**os.environ, "AIRLOCK_SOCKET": sock}
    r: dict[str, Any] = {"runs": runs, "interpreter": sys.executable}
    try:
        deadline = time.monotonic() + 30
        series = _series(str(ws))
        hook_argv, hook_stdin = series["airlock hook claude (ls)"]
        while True:  # up when the hook gets an answer from it
            if time.monotonic() > deadline or (proc.poll() is not None and not socket):
                raise RuntimeError((base / "daemon.log").read_text())
            if os.path.exists(sock):
                _, _, out = _once(hook_argv, hook_stdin, env)
                if b'"allow"' in out:
                    break
            time.sleep(0.1)
        times: dict[str, list[float]] = {name: [] for name in series}
        cpu: dict[str, list[float]] = {name: [] for name in series}
        answers: set[str] = set()
        load_before = os.getloadavg()[0]
        for i in range(warmup + runs):
            for name, (argv, stdin) in series.items():
                elapsed, used, out = _once(argv, stdin, env)
                if i >= warmup:
                    times[name].append(elapsed)
                    cpu[name].append(used)
                if stdin:
                    decision = json.loads(out)["hookSpecificOutput"]["permissionDecision"]
                    answers.add(decision)
        r["ms"] = {name: summarize(xs) for name, xs in times.items()}
        # CPU time (user + system) of the process: what start-up costs without waiting for
        # a busy machine; the wall clock includes that wait (the load average is recorded).
        r["cpu_ms"] = {name: summarize(xs) for name, xs in cpu.items()}
        r["load"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        r["answers"] = sorted(answers)  # ["allow"]: every run took the fast path's allow
        r["imports"] = _import_count(env, hook_stdin)
        hook, bare = r["ms"]["airlock hook claude (ls)"]["p50"], r["ms"]["python -c pass"]["p50"]
        r["hook_over_python_ms"] = round(hook - bare, 1)
        r["met"] = hook <= TARGET_P50_MS
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        shutil.rmtree(base, ignore_errors=True)
    return r


def print_report(r: dict[str, Any]) -> None:
    rows = []
    for name, s in r["ms"].items():
        cpu = r["cpu_ms"][name]
        rows.append([name, ms(s), ms(s, "p90"), ms(s, "min"), ms(cpu), ms(cpu, "min")])
    print(
        format_table(
            f"11. airlock hook start-up, a fresh process each, interleaved, {r['runs']} runs (ms;"
            f" load average {r['load'][0]} -> {r['load'][1]})",
            ["series", "wall p50", "wall p90", "wall min", "cpu p50", "cpu min"],
            rows,
        )
    )
    hook = r["ms"]["airlock hook claude (ls)"]["p50"]
    print(
        f"   hook p50 {hook:.1f} ms = python start-up + {r['hook_over_python_ms']} ms;"
        f" target p50 <= {TARGET_P50_MS:g} ms: {'met' if r['met'] else 'NOT met'};"
        f" answers {r['answers']}; {r['imports']['modules']} modules imported,"
        f" unwanted: {r['imports']['unwanted'] or 'none'}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description="airlock hook start-up latency")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--out", default=None)
    p.add_argument("--socket", default=None, help="use the daemon serving here (default policy)")
    a = p.parse_args()
    if os.geteuid() != 0 and not a.socket:
        print("bench/hook.py needs root (it starts a daemon)", file=sys.stderr)
        return 2
    r = measure(a.runs, socket=a.socket)
    print_report(r)
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
