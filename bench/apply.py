"""What Apply costs: a changeset of 1,000 small new files written to the host.

Run: ``.venv/bin/python bench/apply.py [--files N] [--dirs N] [--runs N] [--dir PATH]``.
No root or overlay needed: a plain directory stands for the overlay's upper (without
whiteouts, :func:`compute_changes` reads it the same way), the changeset is saved
once, then applied ``--runs`` times onto a fresh, empty host directory at the same
path (the last run's tree is renamed aside between runs, outside the timing). The
time is ``apply()`` from the changeset directory to its return: open and check the
manifest, check every content hash and target, write, sync (``syncfs``) and commit.
The files (32 to 1,024 bytes) are spread over ``--dirs`` new directories. ``--dir``
picks the file system (default: the temporary directory). Prints the median and
spread in milliseconds. Target (issue "Apply"): 1,000 files in at most 200 ms.

Each run is followed by a reference: creating and writing the same files with plain
``open``/``write`` (no check, no rename, no sync), the floor the file system sets
right then. On a busy disk both rise together; Apply's own cost is the difference.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

from _stats import format_table, ms, summarize

from airlock.sandbox.apply import apply
from airlock.sandbox.changeset import save
from airlock.sandbox.diff import DiffOptions, Layer, compute_changes

TARGET_MS = 200.0


def build(base: str, files: int, dirs: int) -> tuple[str, str, float]:
    """An upper with ``files`` new files in ``dirs`` directories, and its saved changeset."""
    upper, host, dest = (os.path.join(base, name) for name in ("upper", "host", "changeset"))
    os.mkdir(upper, 0o755)
    os.mkdir(host, 0o755)
    rnd = random.Random(1)
    for i in range(files):
        sub = os.path.join(upper, f"d{i % dirs:03d}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"f{i:05d}.txt"), "wb") as f:
            f.write(rnd.randbytes(rnd.randint(32, 1024)))
    host_b = os.fsencode(host)
    layer = Layer(host_path=host_b, upper=os.fsencode(upper), lower=host_b)
    diff = compute_changes([layer], DiffOptions(workspace=host_b, max_changes=files + dirs + 1))
    t0 = time.perf_counter()
    manifest = save([layer], diff, dest, quota_bytes=1 << 30)
    save_s = time.perf_counter() - t0
    assert len(manifest.changes) == files + dirs, len(manifest.changes)
    return host, dest, save_s


def plain_writes(upper: str, target: str) -> float:
    """The floor: create and write the same files and directories, no checks, rename or sync."""
    contents = []
    for sub in sorted(os.listdir(upper)):
        for name in sorted(os.listdir(os.path.join(upper, sub))):
            with open(os.path.join(upper, sub, name), "rb") as f:
                contents.append((sub, name, f.read()))
    t0 = time.perf_counter()
    os.mkdir(target, 0o755)
    made = set()
    for sub, name, data in contents:
        if sub not in made:
            os.mkdir(os.path.join(target, sub), 0o755)
            made.add(sub)
        fd = os.open(os.path.join(target, sub, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    return time.perf_counter() - t0


def measure(files: int, dirs: int, runs: int, where: str | None) -> dict[str, object]:
    base = tempfile.mkdtemp(prefix="airlock-bench-apply-", dir=where)
    try:
        host, dest, save_s = build(base, files, dirs)
        times: list[float] = []
        floor: list[float] = []
        for run in range(runs):
            # Set the last run's files aside rather than delete them: on a file system
            # mounted with ``discard``, deleting a thousand files stalls the next journal
            # commits (and so the next run's file creations) for hundreds of ms.
            os.rename(host, f"{host}.{run}")
            os.mkdir(host, 0o755)
            os.sync()  # start each run with nothing else dirty
            t0 = time.perf_counter()
            result = apply(dest)
            times.append(time.perf_counter() - t0)
            assert result.complete and result.created == files + dirs, result
            os.sync()
            floor.append(plain_writes(os.path.join(base, "upper"), f"{host}.plain{run}"))
        return {
            "apply": summarize(times),
            "plain": summarize(floor),
            "save_ms": round(save_s * 1000, 1),
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--dirs", type=int, default=10)
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--dir", default=None, help="where to work (default: $TMPDIR)")
    args = parser.parse_args(argv)
    figures = measure(args.files, args.dirs, args.runs, args.dir)
    summary, plain = figures["apply"], figures["plain"]
    assert isinstance(summary, dict) and isinstance(plain, dict)
    rows = [
        [f"apply {args.files} files", ms(summary), ms(summary, "min"), ms(summary, "max")],
        ["plain create+write (floor)", ms(plain), ms(plain, "min"), ms(plain, "max")],
    ]
    print(format_table("Apply (ms)", ["", "p50", "min", "max"], rows))
    met = "met" if summary["p50"] <= TARGET_MS else "NOT met"
    print(f"\nsave (once): {figures['save_ms']} ms; target p50 <= {TARGET_MS:.0f} ms: {met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
