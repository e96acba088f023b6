"""The ``airlock`` command's exit statuses (shared by the dispatcher and the actions)."""

from __future__ import annotations

__all__ = ["EXIT_ASK", "EXIT_DENY", "EXIT_ERROR", "EXIT_OK", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_ASK = 3
EXIT_DENY = 4
