"""Compile the sandbox's init program: ``python native/build.py OUTPUT``.

The one place its compiler flags live: ``make install`` builds it next to airlock/sandbox/init.py
in the source tree, and ``setup.py`` into every wheel (docs/decisions.md §37). ``CC`` picks the
compiler (``cc`` by default); it links only against the C library, statically (``-static-pie``:
no dynamic loader at each sandbox's start; still randomized).

The C library is musl when its development files are installed (Debian's ``musl-tools``, which
``make install`` installs), else glibc; ``AIRLOCK_INIT_LIBC=glibc`` or ``musl`` insists on one.
glibc's start-up asks the CPU for its caches' sizes with ``cpuid``, one VM exit each under a
hypervisor: 0.4 ms of CPU at every start of this program here, against 0.08 ms with musl
(decisions §41). musl ships no kernel headers: the program's ``<linux/...>`` headers come from the
system's (``linux-libc-dev``), through a directory holding only those.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("airlock-sandbox-init.c")
FLAGS = (
    "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror",
    "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong", "-fPIE", "-static-pie",
    "-Wl,-z,relro,-z,now",
)  # fmt: skip


def _ask(cc: list[str], *args: str) -> str:
    return subprocess.run([*cc, *args], check=True, capture_output=True, text=True).stdout.strip()


def _musl(cc: list[str], headers: Path) -> tuple[list[str], list[str]] | None:
    """Arguments that compile and link against musl instead of the compiler's own C library:
    (before the source, with the start files, and after it); None when musl is not installed.
    ``headers`` gets links to the kernel's headers."""
    machine = _ask(cc, "-dumpmachine")  # x86_64-linux-gnu
    musl = machine.replace("-gnu", "-musl")
    lib, include = Path("/usr/lib") / musl, Path("/usr/include") / musl
    kernel = {
        "linux": Path("/usr/include/linux"),
        "asm": Path("/usr/include") / machine / "asm",
        "asm-generic": Path("/usr/include/asm-generic"),
    }
    needed = [lib / n for n in ("rcrt1.o", "crti.o", "crtn.o", "libc.a")]
    if musl == machine or not all(p.exists() for p in [include, *needed, *kernel.values()]):
        return None
    for name, path in kernel.items():
        (headers / name).symlink_to(path)
    gcc_include = _ask(cc, "-print-file-name=include")
    first = [
        "-nostdinc", "-isystem", str(include), "-isystem", gcc_include, "-isystem", str(headers),
        "-nostdlib", str(lib / "rcrt1.o"), str(lib / "crti.o"),
        _ask(cc, "-print-file-name=crtbeginS.o"),
    ]  # fmt: skip
    last = [
        "-L", str(lib), "-lc", _ask(cc, "-print-libgcc-file-name"),
        _ask(cc, "-print-file-name=crtendS.o"), str(lib / "crtn.o"),
    ]  # fmt: skip
    return first, last


def build(output: str | os.PathLike[str]) -> str:
    """Compile ``SOURCE`` into ``output`` (written under a temporary name, then renamed); the C
    library it was linked with (``musl`` or ``glibc``)."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    cc = shlex.split(os.environ.get("CC", "cc"))
    wanted = os.environ.get("AIRLOCK_INIT_LIBC", "")
    if wanted not in ("", "musl", "glibc"):
        sys.exit(f"AIRLOCK_INIT_LIBC: musl or glibc, not {wanted!r}")
    with tempfile.TemporaryDirectory(prefix="airlock-init-headers-") as headers:
        musl = _musl(cc, Path(headers)) if wanted != "glibc" else None
        if musl is None and wanted == "musl":
            sys.exit("AIRLOCK_INIT_LIBC=musl: musl is not installed (Debian: musl-tools)")
        first, last = musl or ([], [])
        subprocess.run([*cc, *FLAGS, "-o", str(tmp), *first, str(SOURCE), *last], check=True)
    tmp.chmod(0o755)
    tmp.replace(out)
    libc = "musl" if musl else "glibc"
    if not musl and not wanted:
        print(f"{out}: linked with glibc (musl-tools is not installed)", file=sys.stderr)
    return libc


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python native/build.py OUTPUT")
    build(sys.argv[1])
