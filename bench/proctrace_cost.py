"""What process-tree capture costs: a fork-heavy command with and without it.

Not a test; run as root: ``.venv/bin/python bench/proctrace_cost.py [--runs N] [--loop N]``.

Each run builds the sandbox's shape (a supervisor that unshares a pid namespace and
forks pid 1, which forks the command process; the command becomes uid 65534 and
execs ``bash -c 'for i in $(seq N); do /bin/true; done'``) and times the command
phase, from releasing the command to reading its exit status, in these variants,
interleaved round-robin so that drift on a shared machine hits all of them alike:

- ``none``:       no capture.
- ``connector``:  the process-events connector only (fork/exec/exit, no argv).
- ``seccomp``:    the exec notification only (argv, no exits).
- ``both``:       both, as ``proctrace`` is meant to be used (sync wake-up on).
- ``both-nosync``: both, without SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP.
- ``strace``:     ``strace -f -e trace=execve`` inside the sandbox (ptrace, a C tracer;
                  ``strace-bpf`` adds ``--seccomp-bpf``): what ptrace-based capture costs.

CPU is the supervisor's own (user+sys) plus everything the sandbox used (init reports
its children's rusage). Prints medians and quartiles; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import select
import shutil
import signal
import statistics
import sys
import time

from airlock.sandbox import _syscalls as sc
from airlock.sandbox import proctrace, user

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VARIANTS = ("none", "connector", "seccomp", "both", "both-nosync", "strace", "strace-bpf")


def _cpu(ru: resource.struct_rusage) -> float:
    return ru.ru_utime + ru.ru_stime


Result = tuple[float, float, float, int, int]


def _supervise(variant: str, script: str) -> Result:
    """(command s, supervisor cpu s, sandbox cpu s, records, argvs); in a forked child.

    ``argvs`` counts records whose argv is exactly ``/bin/true``'s: what was caught.
    """
    use_conn = variant in ("connector", "both", "both-nosync")
    use_seccomp = variant in ("seccomp", "both", "both-nosync")
    argv = ["bash", "-c", script]
    if variant.startswith("strace"):
        strace = shutil.which("strace") or "/usr/bin/strace"
        extra = ["--seccomp-bpf"] if variant == "strace-bpf" else []
        argv = [strace, "-f", "-qq", "-o", "/dev/null", "-e", "trace=execve", *extra, "/bin/bash"]
        argv += ["-c", script]
    conn = proctrace.open_connector() if use_conn else None
    sup, cmd = proctrace.channel()
    sc.unshare(sc.CLONE_NEWPID)
    go_r, go_w = os.pipe()
    st_r, st_w = os.pipe()
    init = os.fork()
    if init == 0:
        sup.close()
        child = os.fork()
        if child == 0:
            os.read(go_r, 1)
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            user.become(65534, 65534, ())
            os.chdir("/")
            if use_seccomp:
                proctrace.install(cmd.fileno())
            else:
                cmd.close()
            os.execve(argv[0] if argv[0].startswith("/") else "/bin/bash", argv, {"PATH": PATH})
        cmd.close()
        while os.wait()[0] != child:
            pass
        os.write(st_w, pickle.dumps(_cpu(resource.getrusage(resource.RUSAGE_CHILDREN))))
        os._exit(0)
    cmd.close()
    os.close(st_w)
    tracer = None
    if use_conn or use_seccomp:
        sync = variant != "both-nosync"
        tracer = proctrace.ProcessTracer(conn, sup, init, sync_wakeup=sync)
    else:
        sup.close()
    cpu0 = _cpu(resource.getrusage(resource.RUSAGE_SELF))
    t0 = time.monotonic()
    os.write(go_w, b"g")
    poller = select.poll()
    poller.register(st_r, select.POLLIN)
    if tracer is not None:
        poller.register(tracer.fileno(), select.POLLIN)
    report = b""
    done = False
    while not done:
        for fd, _ev in poller.poll():
            if tracer is not None and fd == tracer.fileno():
                tracer.handle()
            else:
                chunk = os.read(st_r, 4096)
                report += chunk
                done = not chunk
    elapsed = time.monotonic() - t0
    os.waitpid(init, 0)
    records = argvs = 0
    if tracer is not None:
        tracer.finish()
        recs = tracer.records()
        records, argvs = len(recs), sum(r.argv == (b"/bin/true",) for r in recs)
        tracer.close()
    cpu_sup = _cpu(resource.getrusage(resource.RUSAGE_SELF)) - cpu0
    return elapsed, cpu_sup, pickle.loads(report), records, argvs


def run_once(variant: str, script: str) -> Result:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.write(w, pickle.dumps(_supervise(variant, script)))
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    result: Result = pickle.loads(data)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--loop", type=int, default=1000)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root")
    variants = [v for v in args.variants.split(",") if v]
    if not shutil.which("strace"):
        variants = [v for v in variants if not v.startswith("strace")]
    script = f"for i in $(seq {args.loop}); do /bin/true; done"
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    results: dict[str, list[Result]] = {v: [] for v in variants}
    run_once("none", script)  # warm the page cache
    for _ in range(args.runs):
        for v in variants:
            results[v].append(run_once(v, script))
    nones = [r[0] for r in results.get("none", [])]
    base = statistics.median(nones) if nones else None
    print(f"{args.loop} x fork+exec /bin/true, {args.runs} runs each, {os.cpu_count()} CPUs")
    print(
        f"{'variant':<12} {'wall p50':>9} {'p25':>7} {'p75':>7} {'x none':>7} {'paired':>7} "
        f"{'per exec':>9} {'sup cpu':>8} {'sbx cpu':>8} {'cpu x':>6} {'records':>8} {'argvs':>6}"
    )
    cpu_base = statistics.median(r[1] + r[2] for r in results["none"]) if nones else None
    for v, rs in results.items():
        walls = sorted(r[0] for r in rs)
        q = statistics.quantiles(walls, n=4) if len(walls) > 1 else [walls[0]] * 3
        p50 = statistics.median(walls)
        # Each run against the `none` run of the same round: drift on a shared machine cancels.
        paired = statistics.median(r[0] / n for r, n in zip(rs, nones, strict=True)) if nones else 0
        ratio = f"{p50 / base:.2f}" if base else "-"
        per = f"{(p50 - base) / args.loop * 1e6:.0f} us" if base else "-"
        sup = statistics.median(r[1] for r in rs)
        sbx = statistics.median(r[2] for r in rs)
        cpu_x = f"{(sup + sbx) / cpu_base:.2f}" if cpu_base else "-"
        print(
            f"{v:<12} {p50 * 1000:>7.0f}ms {q[0] * 1000:>5.0f}ms {q[2] * 1000:>5.0f}ms "
            f"{ratio:>7} {paired:>7.2f} {per:>9} {sup * 1000:>6.0f}ms {sbx * 1000:>6.0f}ms "
            f"{cpu_x:>6} {rs[0][3]:>8} {min(r[4] for r in rs):>6}"
        )


if __name__ == "__main__":
    main()
