"""``airlock hook install|uninstall claude|codex|gemini|cursor [--project DIR]``.

Adds ``airlock hook AGENT`` to the agent's own settings file as its pre-shell hook, or
removes it again. User level by default (every project of this user), the project's file
with ``--project DIR``:

=======  ================================  ======================================  ==========
agent    user file                         project file                            entry
=======  ================================  ======================================  ==========
claude   ``~/.claude/settings.json`` [1]   ``DIR/.claude/settings.json``           PreToolUse
codex    ``~/.codex/hooks.json`` [1]       ``DIR/.codex/hooks.json``               PreToolUse,
                                                                                   Permission
                                                                                   Request
gemini   ``~/.gemini/settings.json``       ``DIR/.gemini/settings.json``           BeforeTool
cursor   ``~/.cursor/hooks.json``          ``DIR/.cursor/hooks.json``              beforeShell
                                                                                   Execution
=======  ================================  ======================================  ==========

[1] Or in ``$CLAUDE_CONFIG_DIR`` / ``$CODEX_HOME`` when set: the agent reads its user-level
settings there.

Claude Code, Codex and Gemini CLI share one shape, ``hooks.EVENT = [{"matcher": TOOL,
"hooks": [{"type": "command", "command": ...}]}]`` (matcher ``Bash``, or
``run_shell_command`` for Gemini); Cursor has ``{"version": 1, "hooks": {"beforeShellExecution":
[{"command": ...}]}}``. Codex gets the same entry twice, under ``PreToolUse`` and under
``PermissionRequest`` (its approval prompt, which ``airlock hook codex`` answers too); install
and uninstall always handle both. The sources are recorded in tests/data/hooks/install.json.

The rules: the file is read as JSON and refused, untouched, if it is not an object of the
expected shape (a person must fix it: overwriting it would lose their settings). Every
other key, event and hook is kept as it was. A file that changes is first copied to
``FILE.airlock-backup-TIME`` and then replaced atomically (a symbolic link is followed, so
the file it points to is the one updated). Installing twice changes nothing the second
time; uninstalling removes only Airlock's entries (a command that runs ``airlock hook AGENT``)
and a matcher group or event list they leave empty, nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AGENTS", "Change", "HookConfError", "Target", "install", "main", "target", "uninstall"]

AGENTS = ("claude", "codex", "gemini", "cursor")


class HookConfError(Exception):
    """The settings file cannot be changed safely (the message says why)."""


@dataclass(frozen=True)
class Target:
    """Where and in what form one agent's hook goes."""

    agent: str
    path: Path
    event: str
    matcher: str | None  # None: the agent's entries have no matcher groups (Cursor)
    timeout: int | None  # in the agent's unit (seconds; milliseconds for Gemini)
    more_events: tuple[str, ...] = ()  # events that get the same entry (Codex's approvals)

    @property
    def events(self) -> tuple[str, ...]:
        """Every event the hook is installed for: ``event`` first."""
        return (self.event, *self.more_events)


@dataclass(frozen=True)
class Change:
    """What install or uninstall did."""

    path: Path
    changed: bool
    backup: Path | None
    message: str


# (directory under HOME or the project, file name, event, matcher, timeout). The hook itself
# gives up after 45 s (airlock.cli.hook.DEFAULT_DEADLINE_S), before the agent does.
_LAYOUT: dict[str, tuple[str, str, str, str | None, int | None]] = {
    "claude": (".claude", "settings.json", "PreToolUse", "Bash", 60),
    "codex": (".codex", "hooks.json", "PreToolUse", "Bash", 60),
    "gemini": (".gemini", "settings.json", "BeforeTool", "run_shell_command", 60_000),
    "cursor": (".cursor", "hooks.json", "beforeShellExecution", None, None),
}
# The variable that moves an agent's user-level directory, as the agent reads it: Claude
# Code's CLAUDE_CONFIG_DIR (default ~/.claude), Codex's CODEX_HOME (default ~/.codex). A
# user-level install must write where the agent will read.
_USER_DIR_VARIABLE: dict[str, str] = {"claude": "CLAUDE_CONFIG_DIR", "codex": "CODEX_HOME"}
# Further events whose entry is the same as the first's (airlock.cli.hook answers them).
_MORE_EVENTS: dict[str, tuple[str, ...]] = {"codex": ("PermissionRequest",)}


def target(agent: str, project: str | None = None) -> Target:
    """The settings file of ``agent``: the user's (``$HOME``, or the directory the agent's own
    variable names: ``CLAUDE_CONFIG_DIR``, ``CODEX_HOME``), or ``project``'s."""
    directory, name, event, matcher, timeout = _LAYOUT[agent]
    moved = os.environ.get(_USER_DIR_VARIABLE.get(agent, ""), "")
    if project is not None:
        path = Path(project).resolve() / directory / name
    elif moved:
        path = Path(moved).expanduser().absolute() / name
    else:
        path = Path.home() / directory / name
    return Target(agent, path, event, matcher, timeout, _MORE_EVENTS.get(agent, ()))


def hook_command(agent: str, socket: str | None = None, program: str | None = None) -> str:
    """The command line the agent runs: ``airlock hook AGENT`` (with ``--socket``)."""
    words = [program or _program(), "hook", agent]
    if socket:
        words += ["--socket", os.path.abspath(socket)]
    return shlex.join(words)


def _program() -> str:
    """``airlock`` when that name finds this installation on PATH; its full path otherwise
    (an agent may run hooks with a shorter PATH than the shell's)."""
    found = shutil.which("airlock")
    mine = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if found and mine is not None and Path(found).resolve() == mine:
        return "airlock"
    if mine is not None and mine.name == "airlock" and os.access(mine, os.X_OK):
        return str(mine)
    return found or "airlock"


def _is_ours(command: object, agent: str) -> bool:
    """Whether a hook's command runs ``airlock hook AGENT`` (by any path, with any flags)."""
    if not isinstance(command, str):
        return False
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    return (
        len(words) >= 3
        and re.fullmatch(r"(.*/)?airlock", words[0]) is not None
        and words[1:3] == ["hook", agent]
    )


# --- reading and writing the file ---------------------------------------------------------


def _load(path: Path) -> dict[str, Any] | None:
    """The file's JSON object; None if there is no file. Refuses anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise HookConfError(f"cannot read {path}: {e}") from None
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as e:
        raise HookConfError(
            f"{path} is not valid JSON ({e}); fix it or add the hook by hand: it was left as it was"
        ) from None
    if not isinstance(data, dict):
        raise HookConfError(f"{path} does not hold a JSON object; it was left as it was")
    return data


def _hooks_of(data: dict[str, Any], t: Target) -> dict[str, Any]:
    """``data["hooks"]`` once every event of ``t`` in it has the expected shape."""
    hooks = data.setdefault("hooks", {})
    if not isinstance(hooks, dict):
        raise HookConfError(f'{t.path}: "hooks" is not an object; it was left as it was')
    for event in t.events:
        groups = hooks.get(event, [])
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise HookConfError(
                f'{t.path}: "hooks.{event}" is not a list of objects; it was left as it was'
            )
        if t.matcher is not None:
            for g in groups:
                inner = g.get("hooks", [])
                if not isinstance(inner, list) or not all(isinstance(h, dict) for h in inner):
                    raise HookConfError(
                        f'{t.path}: a "hooks.{event}" entry has a "hooks" that is not a list '
                        "of objects; it was left as it was"
                    )
    return hooks


def _write(path: Path, data: dict[str, Any], existed: bool) -> Path | None:
    """Back the old file up, then replace it atomically with ``data``; the backup's path."""
    real = path.resolve() if path.is_symlink() else path
    real.parent.mkdir(parents=True, exist_ok=True)
    backup = None
    if existed:
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S.%f")
        backup = real.with_name(f"{real.name}.airlock-backup-{stamp}")
        shutil.copy2(real, backup)
    mode = real.stat().st_mode & 0o7777 if existed else None
    fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", dir=real.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return backup


# --- install / uninstall --------------------------------------------------------------------


def _entry(t: Target, command: str) -> dict[str, Any]:
    if t.matcher is None:
        return {"command": command}
    hook: dict[str, Any] = {"type": "command", "command": command}
    if t.agent == "gemini":
        hook = {"name": "airlock", **hook, "description": "Airlock judges the shell command"}
    if t.timeout is not None:
        hook["timeout"] = t.timeout
    return hook


def _install_event(hooks: dict[str, Any], t: Target, event: str, command: str) -> bool:
    """Make ``command`` Airlock's one entry of ``event``; whether anything changed."""
    groups: list[dict[str, Any]] = hooks.setdefault(event, [])
    if t.matcher is None:
        ours = [g for g in groups if _is_ours(g.get("command"), t.agent)]
        if [g.get("command") for g in ours] == [command]:
            return False
        groups[:] = [g for g in groups if not _is_ours(g.get("command"), t.agent)]
        groups.append(_entry(t, command))
        return True
    found = [
        (g, h) for g in groups for h in g.get("hooks", []) if _is_ours(h.get("command"), t.agent)
    ]
    if (
        len(found) == 1
        and found[0][0].get("matcher") == t.matcher
        and found[0][1].get("command") == command
    ):
        return False
    _remove(groups, t)
    group = next((g for g in groups if g.get("matcher") == t.matcher), None)
    if group is None:
        groups.append({"matcher": t.matcher, "hooks": [_entry(t, command)]})
    else:
        group.setdefault("hooks", []).append(_entry(t, command))
    return True


def _names(events: Sequence[str]) -> str:
    return " and ".join(events) + (" hooks" if len(events) > 1 else " hook")


def install(t: Target, command: str) -> Change:
    """Add ``command`` as ``t.agent``'s hook for each of ``t.events`` in ``t.path``
    (idempotent: nothing is written when every event already has exactly it)."""
    data = _load(t.path)
    existed = data is not None
    data = {} if data is None else data
    if t.agent == "cursor" and "version" not in data:
        data = {"version": 1, **data}  # Cursor's hooks.json starts with its format version
    hooks = _hooks_of(data, t)
    changed = [event for event in t.events if _install_event(hooks, t, event, command)]
    if not changed:
        return Change(t.path, False, None, f"already installed in {t.path}; nothing changed")
    backup = _write(t.path, data, existed)
    return Change(
        t.path, True, backup, f"installed `{command}` as the {_names(t.events)} in {t.path}"
    )


def _remove(groups: list[dict[str, Any]], t: Target) -> int:
    """Drop Airlock's entries (and the groups they leave empty); how many were dropped."""
    removed = 0
    kept: list[dict[str, Any]] = []
    for g in groups:
        if t.matcher is None:
            if _is_ours(g.get("command"), t.agent):
                removed += 1
                continue
            kept.append(g)
            continue
        inner = g.get("hooks", [])
        rest = [h for h in inner if not _is_ours(h.get("command"), t.agent)]
        removed += len(inner) - len(rest)
        if rest or not inner:
            if len(rest) != len(inner):
                g["hooks"] = rest
            kept.append(g)
    groups[:] = kept
    return removed


def uninstall(t: Target) -> Change:
    """Remove ``t.agent``'s Airlock hooks (every one of ``t.events``) from ``t.path``;
    nothing else."""
    data = _load(t.path)
    if data is None:
        return Change(t.path, False, None, f"{t.path} does not exist; nothing changed")
    if "hooks" not in data:
        return Change(t.path, False, None, f"not installed in {t.path}; nothing changed")
    hooks = _hooks_of(data, t)
    removed: list[str] = []
    for event in t.events:
        if event not in hooks:
            continue
        groups: list[dict[str, Any]] = hooks[event]
        if _remove(groups, t):
            removed.append(event)
            if not groups:
                del hooks[event]
    if not removed:
        return Change(t.path, False, None, f"not installed in {t.path}; nothing changed")
    if not hooks:
        del data["hooks"]
    backup = _write(t.path, data, True)
    return Change(t.path, True, backup, f"removed the Airlock {_names(removed)} from {t.path}")


# --- the command ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="airlock hook",
        description="Add `airlock hook AGENT` to the agent's settings as its pre-shell hook "
        "(Codex: and its PermissionRequest hook), "
        "or remove it. The file is backed up before it changes; other settings and hooks "
        "are kept; a file that is not valid JSON is refused and left alone.",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="install|uninstall")
    for action, text in (("install", "add the hook"), ("uninstall", "remove the hook")):
        p = sub.add_parser(action, help=text)
        p.add_argument("agent", choices=AGENTS)
        p.add_argument(
            "--project",
            metavar="DIR",
            default=None,
            help="the project's settings file under DIR (default: the user's, under $HOME)",
        )
        if action == "install":
            p.add_argument(
                "--socket",
                metavar="PATH",
                default=None,
                help="the daemon's socket, written into the hook's command (default: the "
                "hook uses $AIRLOCK_SOCKET, else the system socket)",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``airlock hook install|uninstall ...`` (``argv``: the words after ``hook``)."""
    try:
        args = _parser().parse_args(list(argv) if argv is not None else sys.argv[1:])
    except SystemExit as e:
        return 0 if e.code in (0, None) else 2
    t = target(args.agent, args.project)
    try:
        if args.action == "install":
            change = install(t, hook_command(args.agent, args.socket))
        else:
            change = uninstall(t)
    except HookConfError as e:
        print(f"airlock: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"airlock: error: {t.path}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"airlock: {change.message}")
    if change.backup is not None:
        print(f"airlock: the previous file is kept as {change.backup}")
    return 0
