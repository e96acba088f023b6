"""Ids, tokens and anchors a caller sends: bounded and checked before anything uses them.

A validation id, a session id, an approval token, a page token or an audit anchor is short
by nature (the daemon's own ids are 32 hex digits, its tokens 43 characters). One that is
not is refused up front with INVALID_ARGUMENT (``INVALID_ID``), and the refusal quotes no
more than a short prefix of it: an error that echoed a 10,000-character id made a status
larger than gRPC's metadata limit, which the client then saw as RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from airlock._errors import InvalidRequest

__all__ = ["MAX_ID_BYTES", "checked_id", "shown"]

# The most UTF-8 bytes of any id, token or anchor a request carries.
MAX_ID_BYTES = 256
# How much of a refused value an error message quotes.
_SHOWN_CHARS = 16


def shown(value: str) -> str:
    """A refused value for a message: its first characters, quoted (control characters
    escaped), and how long it was when it is longer."""
    head = repr(value[:_SHOWN_CHARS])
    return head if len(value) <= _SHOWN_CHARS else f"{head}... ({len(value)} characters)"


def checked_id(field_name: str, value: str) -> str:
    """``value`` if it can be an id: at most MAX_ID_BYTES bytes and no control character
    (a NUL, a newline, an escape sequence for a terminal); else InvalidRequest naming
    ``field_name``. An empty value passes: the caller decides whether one is required."""
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size > MAX_ID_BYTES:
        raise InvalidRequest(
            f"{field_name}: is {size} bytes; the limit is {MAX_ID_BYTES} ({shown(value)})",
            reason="INVALID_ID",
        )
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value):
        raise InvalidRequest(
            f"{field_name}: contains a control character ({shown(value)})", reason="INVALID_ID"
        )
    return value
