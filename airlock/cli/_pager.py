"""A report taller than the terminal goes through a pager, as ``git`` and ``man`` do.

Only when the console is a terminal and standard input is one too (a person is there to
page); never for piped output. The pager is ``$AIRLOCK_PAGER``, else ``$PAGER``, else ``less``
when it is installed; an empty ``AIRLOCK_PAGER`` (or ``--no-pager``) turns paging off. ``less``
gets ``LESS=FRX`` unless ``LESS`` is set: colours pass through (``R``), a report that fits
prints as it is (``F``), and the screen is not cleared on exit (``X``), so the verdict stays
in view above what comes next (a prompt, the next command). The pager writes to the
console's own stream, so ``airlock approve``'s report (on standard error) is paged even when
its standard output, the token, is captured. A pager that cannot start, or fails, leaves the
report printed as it would have been without one.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys

from rich.console import Console, RenderableType

__all__ = ["pager_command", "show"]


def pager_command() -> list[str] | None:
    """The pager to run (its words, split as a shell would: ``PAGER="less -S"``), or None."""
    chosen = os.environ.get("AIRLOCK_PAGER")
    if chosen is None:
        chosen = os.environ.get("PAGER")
    if chosen is None:
        chosen = "less" if shutil.which("less") else ""
    try:
        words = shlex.split(chosen)
    except ValueError:  # unbalanced quotes: no pager rather than a guess
        return None
    return words or None


def _rendered(console: Console, renderable: RenderableType) -> str:
    """The renderable as the console would print it (same width, same colours)."""
    buffer = io.StringIO()
    copy = Console(
        file=buffer,
        width=console.width,
        color_system=console.color_system,  # type: ignore[arg-type]
        force_terminal=console.is_terminal,
        highlight=False,
        emoji=False,
    )
    copy.print(renderable)
    return buffer.getvalue()


def show(console: Console, renderable: RenderableType, *, paging: bool = True) -> bool:
    """Print ``renderable`` on ``console``; through the pager when it is taller than the
    terminal and a person is there. Returns whether the pager showed it."""
    command = pager_command() if paging else None
    if command is None or not console.is_terminal or not sys.stdin.isatty():
        console.print(renderable)
        return False
    text = _rendered(console, renderable)
    if text.count("\n") < console.height - 1:
        console.file.write(text)
        console.file.flush()
        return False
    env = dict(os.environ)
    env.setdefault("LESS", "FRX")
    try:
        console.file.flush()
        subprocess.run(command, input=text.encode(), stdout=console.file, env=env, check=False)
    except (OSError, ValueError):  # cannot start, or no descriptor behind the console
        console.file.write(text)
        console.file.flush()
        return False
    except KeyboardInterrupt:  # the person left the pager with ^C: the report was seen
        return True
    return True
