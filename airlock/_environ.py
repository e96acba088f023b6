"""The caller's environment as a request carries it, read in one place for every caller.

The Python client, the CLI (``airlock validate``/``run``), ``airlock hook`` and ``airlock mcp``
all send it by default (docs/decisions.md section 33): a dry run must see what the real run
would see. ``airlock hook`` imports this on its allow path, so it imports nothing but
:mod:`os` (see :mod:`airlock._vocab` for why that matters).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["caller_environment"]


def caller_environment(on_skip: Callable[[str], None] | None = None) -> dict[str, str]:
    """``os.environ`` of this process, less the variables a request cannot carry.

    Left out, each with one call of ``on_skip`` (if given) with a line that names it: a
    variable whose name or value is not valid UTF-8 (``os.environ`` holds such bytes as
    surrogates; the API carries UTF-8, and the daemon would refuse the whole request:
    ``INVALID_ENCODING``), and one with an empty name (only ``execve`` can make one; the
    daemon would refuse it: ``INVALID_ENV``). Nothing else is changed or left out.
    """
    env: dict[str, str] = {}
    for key, value in os.environ.items():
        if not key:
            if on_skip is not None:
                on_skip("not passing a variable with an empty name")
            continue
        try:
            key.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:
            if on_skip is not None:
                on_skip(f"not passing {os.fsencode(key)!r}: not valid UTF-8")
            continue
        env[key] = value
    return env
