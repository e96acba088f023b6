"""SHA-256 (and git's object hashes) for the sandbox modules, without ``hashlib`` in the spawner.

``hashlib`` loads OpenSSL's libcrypto (3.3 MiB resident). The spawner imports every sandbox
module so that its forks do not, and never hashes anything itself: with ``hashlib`` imported at
the top of those modules it held libcrypto for nothing (issue 16's idle RSS). Each supervisor
calls :func:`load` as it starts, as root: later, while it reads a caller's files as that caller
(``setfsuid``, the apply child's ``setresuid``), importing a module could fail, the interpreter's
own files being unreadable to the caller (a pyenv under ``/root``). Supervisors are reused, so
that is once per process, off the request's path but for a cold one. Random tokens come from
``os.urandom`` (what ``secrets`` reads), not ``secrets``, which imports ``hashlib`` through
``hmac``. ``tests/unit/sandbox/test_spawner_imports.py`` checks both.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = ["load", "new", "random_bits", "sha256", "token_hex"]


def load() -> None:
    """Import ``hashlib`` now (a supervisor, before it does anything as a caller)."""
    import hashlib  # noqa: F401


def sha256(data: bytes = b"") -> _Hash:
    import hashlib

    return hashlib.sha256(data)


def new(name: str) -> _Hash:
    """``hashlib.new(name)``: git's object hash (``sha1`` or ``sha256``)."""
    import hashlib

    return hashlib.new(name)


def token_hex(nbytes: int) -> str:
    """``secrets.token_hex``: ``nbytes`` random bytes from the kernel, in hex."""
    return os.urandom(nbytes).hex()


def random_bits(k: int) -> int:
    """``secrets.randbits``: a random integer of ``k`` bits from the kernel."""
    return int.from_bytes(os.urandom((k + 7) // 8), "little") >> (-k % 8)
