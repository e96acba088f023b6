"""What a native directory scanner would save the diff walk: a measurement, not a product part.

Not a test; run as root or not: ``.venv/bin/python bench/native_scan.py [N] [--reps 9]``
(needs ``cc``).

Makes N new small files (``"$i\\n"``, as issue 16's loop leaves) in a directory on ``/dev/shm``
(a tmpfs, as the sandbox's scratch), compiles the C function below into a temporary shared
library, and times, CPU per file (``time.process_time``, median of ``--reps``, the variants
interleaved):

``python``
    the system calls :func:`airlock.sandbox.diff.compute_changes` makes per new small file,
    through Python as it makes them: ``scandir`` and each entry's ``lstat``; ``open``,
    ``read``, ``listxattr`` (file capabilities) and ``close``; SHA-256 of the content;
``c``
    the same system calls in one C call per directory (``getdents64``, ``fstatat``,
    ``openat``, ``read``, ``flistxattr``, ``close``) writing packed records, then each record
    unpacked in Python into a name, its stat fields and its content, plus the SHA-256;
``c-only``
    the C call alone: the kernel's own work for these calls plus C's.

The difference ``python`` - ``c`` is what a native scanner would take off the walk's ~11-17 µs
per file (the rest is building each change in Python: its fields, its unified diff);
docs/decisions.md §48 weighs it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import os
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable

C_SOURCE = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

struct rec {
    uint32_t reclen, mode, uid, gid;
    uint64_t size, nlink, blocks, dev, ino, rdev;
    int32_t content_len;
    uint32_t flags;
    uint16_t namelen;
};

long scan(int dirfd, char *out, long cap, long small) {
    char dbuf[32768];
    long used = 0;
    if (lseek(dirfd, 0, SEEK_SET) < 0) return -1;
    for (;;) {
        long n = syscall(SYS_getdents64, dirfd, dbuf, sizeof dbuf);
        if (n <= 0) break;
        for (long off = 0; off < n;) {
            struct { uint64_t ino; int64_t off; unsigned short reclen; unsigned char type;
                     char name[]; } *d = (void *)(dbuf + off);
            off += d->reclen;
            if (d->name[0] == '.' && (!d->name[1] || (d->name[1] == '.' && !d->name[2])))
                continue;
            struct stat st;
            if (fstatat(dirfd, d->name, &st, AT_SYMLINK_NOFOLLOW)) continue;
            size_t nl = strlen(d->name);
            int small_file = S_ISREG(st.st_mode) && st.st_size < small;
            long need = (long)sizeof(struct rec) + (long)nl + (small_file ? st.st_size + 1 : 0);
            need = (need + 7) & ~7L;
            if (used + need > cap) return -2;
            struct rec *r = (void *)(out + used);
            r->mode = st.st_mode; r->uid = st.st_uid; r->gid = st.st_gid;
            r->size = st.st_size; r->nlink = st.st_nlink; r->blocks = st.st_blocks;
            r->dev = st.st_dev; r->ino = st.st_ino; r->rdev = st.st_rdev;
            r->namelen = (uint16_t)nl; r->flags = 0; r->content_len = -1;
            char *p = (char *)(r + 1);
            memcpy(p, d->name, nl);
            if (small_file) {
                int fd = openat(dirfd, d->name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY
                                | O_CLOEXEC);
                if (fd >= 0) {
                    ssize_t got = read(fd, p + nl, st.st_size + 1);
                    if (got >= 0) r->content_len = (int32_t)got;
                    char names[256];
                    if (flistxattr(fd, names, sizeof names) > 0) r->flags |= 1;
                    close(fd);
                }
            }
            r->reclen = (uint32_t)need;
            used += need;
        }
    }
    return used;
}
"""

_REC = struct.Struct("=IIIIQQQQQQiIH")
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _python(dirfd: int) -> int:
    n = 0
    os.lseek(dirfd, 0, os.SEEK_SET)  # scandir reads on from the shared offset
    with os.scandir(dirfd) as it:
        for entry in it:
            st = entry.stat(follow_symlinks=False)
            fd = os.open(entry.name, _FILE_FLAGS, dir_fd=dirfd)
            try:
                data = os.read(fd, st.st_size + 1)
                os.listxattr(fd)
            finally:
                os.close(fd)
            hashlib.sha256(data).hexdigest()
            n += 1
    return n


def _c(scan: Callable[..., int], buf: ctypes.Array[ctypes.c_char], dirfd: int) -> int:
    used = scan(dirfd, buf, len(buf), 64 * 1024)
    raw = ctypes.string_at(buf, used)
    off, n, unpack, size = 0, 0, _REC.unpack_from, _REC.size
    while off < used:
        reclen, *_fields, clen, _flags, namelen = unpack(raw, off)
        p = off + size
        name = raw[p : p + namelen]
        data = raw[p + namelen : p + namelen + clen] if clen >= 0 else b""
        hashlib.sha256(data).hexdigest()
        assert name
        off += reclen
        n += 1
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="?", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=9)
    a = p.parse_args()
    cc = shutil.which("cc")
    if cc is None:
        print("no C compiler (cc): nothing measured")
        return 1
    with contextlib.ExitStack() as stack:
        build = stack.enter_context(tempfile.TemporaryDirectory(prefix="airlock-native-scan-"))
        data = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="airlock-native-scan-", dir="/dev/shm")
        )
        src, lib = os.path.join(build, "scan.c"), os.path.join(build, "scan.so")
        with open(src, "w") as f:
            f.write(C_SOURCE)
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", lib, src], check=True)
        scan = ctypes.CDLL(lib).scan
        scan.restype = ctypes.c_long
        scan.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_long, ctypes.c_long]
        buf = ctypes.create_string_buffer(64 << 20)
        for i in range(1, a.files + 1):
            with open(os.path.join(data, f"f{i}"), "w") as f:
                f.write(f"{i}\n")
        dirfd = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
        try:
            variants: dict[str, Callable[[], int]] = {
                "python": lambda: _python(dirfd),
                "c": lambda: _c(scan, buf, dirfd),
                "c-only": lambda: scan(dirfd, buf, len(buf), 64 * 1024) and a.files,
            }
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(a.reps + 1):  # the first round warms up
                for name, run in variants.items():
                    t0 = time.process_time()
                    seen = run()
                    assert seen == a.files, (name, seen)
                    times[name].append(time.process_time() - t0)
        finally:
            os.close(dirfd)
    print(f"{a.files} new small files on /dev/shm; CPU µs per file, median of {a.reps}")
    for name, ts in times.items():
        print(f"  {name:<8} {statistics.median(ts[1:]) / a.files * 1e6:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
