"""Compile the sandbox's init program: ``python native/build.py OUTPUT``.

The one place its compiler flags live: ``make install`` builds it next to airlock/sandbox/init.py
in the source tree, and ``setup.py`` into every wheel (docs/decisions.md §37). ``CC`` picks the
compiler (``cc`` by default); it links only against the C library, statically (``-static-pie``:
no dynamic loader at each sandbox's start; still randomized).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("airlock-sandbox-init.c")
FLAGS = (
    "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror",
    "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong", "-fPIE", "-static-pie",
    "-Wl,-z,relro,-z,now",
)  # fmt: skip


def build(output: str | os.PathLike[str]) -> None:
    """Compile ``SOURCE`` into ``output`` (written under a temporary name, then renamed)."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    cc = shlex.split(os.environ.get("CC", "cc"))
    subprocess.run([*cc, *FLAGS, "-o", str(tmp), str(SOURCE)], check=True)
    tmp.chmod(0o755)
    tmp.replace(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python native/build.py OUTPUT")
    build(sys.argv[1])
