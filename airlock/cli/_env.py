"""The caller's environment for ``airlock validate`` and ``airlock run``, with a warning on the
terminal for each variable left out (:func:`airlock._environ.caller_environment` reads it)."""

from __future__ import annotations

from rich.console import Console

from airlock._environ import caller_environment

__all__ = ["environment"]


def environment(err: Console) -> dict[str, str]:
    return caller_environment(
        lambda why: err.print(f"airlock: warning: {why}", markup=False, highlight=False)
    )
