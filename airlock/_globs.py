"""The path-glob syntax shared by the read recorder and the policy's effect rules.

``*`` and ``?`` stay within one path component, ``**`` spans any number of them
(``**/`` also none); everything else is literal. One translation, so that a glob
means the same thing where the policy checks it and where the sandbox watches it.
"""

from __future__ import annotations

import re

__all__ = ["glob_regex"]


def glob_regex(raw: bytes) -> bytes:
    """The regular expression (not anchored) of the path glob ``raw``."""
    out: list[bytes] = []
    i = 0
    while i < len(raw):
        if raw.startswith(b"**/", i):
            out.append(b"(?:[^/]*/)*")
            i += 3
        elif raw.startswith(b"**", i):
            out.append(b".*")
            i += 2
        elif raw[i : i + 1] == b"*":
            out.append(b"[^/]*")
            i += 1
        elif raw[i : i + 1] == b"?":
            out.append(b"[^/]")
            i += 1
        else:
            out.append(re.escape(raw[i : i + 1]))
            i += 1
    return b"".join(out)
