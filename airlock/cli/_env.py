"""The caller's environment, read in one place for every command that sends one."""

from __future__ import annotations

import os

from rich.console import Console

__all__ = ["environment"]


def environment(err: Console) -> dict[str, str]:
    env: dict[str, str] = {}
    for key, value in os.environ.items():
        try:
            key.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:
            # os.environ holds undecodable bytes as surrogates; the API carries UTF-8.
            err.print(
                f"airlock: warning: not passing {key.encode('utf-8', 'backslashreplace')!r}:"
                " not valid UTF-8",
                markup=False,
                highlight=False,
            )
            continue
        env[key] = value
    return env
