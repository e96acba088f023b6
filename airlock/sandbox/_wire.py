"""Messages between the daemon, the spawner and supervisors: length-prefixed pickles.

Only Airlock's own frozen dataclasses and enums may be named in a message: the
unpickler refuses every other class, so a message can carry data, never code.
Every peer is Airlock's own root-owned process; no message ever comes from the
sandboxed command.
"""

from __future__ import annotations

import enum
import io
import os
import pickle
import socket
import struct
from typing import Any

from airlock.sandbox import _gcpause

__all__ = ["HEADER_BYTES", "dumps", "loads", "read_fd", "recv", "send"]

_HEADER = struct.Struct("!Q")
HEADER_BYTES = _HEADER.size  # what dumps() puts before the pickle
MAX_MESSAGE = 256 * 1024 * 1024
_LARGE = 64 * 1024  # loads() of a message this large pauses the cyclic collector


def _enum_member(cls: object, name: object) -> enum.Enum:
    """What ``getattr(cls, name)`` means in a pickle, and all it may mean here: a member of one
    of Airlock's enums. Some Python releases (3.11.0 to 3.11.3) pickle an enum member as
    ``getattr(Class, name)``; others as ``Class(value)``."""
    if (
        isinstance(cls, type)
        and issubclass(cls, enum.Enum)
        and cls.__module__.startswith("airlock.")
        and isinstance(name, str)
        and name in cls.__members__
    ):
        return cls.__members__[name]
    raise pickle.UnpicklingError(f"refusing getattr({cls!r}, {name!r})")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("airlock.") and not name.startswith("_"):
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def dumps(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def loads(data: bytes) -> Any:
    if len(data) < _LARGE:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    # Thousands of new objects and no reference cycles (a large result: its changes): the
    # cyclic collector would run many times for nothing while they are made.
    with _gcpause.paused():
        return _RestrictedUnpickler(io.BytesIO(data)).load()


def _size(header: bytes) -> int:
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE:
        raise EOFError(f"message of {size} bytes is too large")
    return int(size)


def _exact(read: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = read(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def send(sock: socket.socket, obj: object) -> None:
    sock.sendall(dumps(obj))


def recv(sock: socket.socket) -> Any:
    return loads(_exact(sock.recv, _size(_exact(sock.recv, _HEADER.size))))


def read_fd(fd: int) -> Any:
    """Read one message from a pipe."""

    def read(n: int) -> bytes:
        return os.read(fd, n)

    return loads(_exact(read, _size(_exact(read, _HEADER.size))))
