"""``airlock hook install|uninstall``: each agent's settings file, in a temporary HOME.

Merging keeps every other setting and hook, a second install changes nothing, a change is
backed up first, uninstall removes exactly Airlock's entry, and a file that is not JSON of
the expected shape is refused and left byte for byte as it was."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from airlock.cli import hookconf
from airlock.cli.main import main as airlock_main

DATA = Path(__file__).resolve().parents[2] / "data" / "hooks"
AGENTS = hookconf.AGENTS
FILES = {
    "claude": ".claude/settings.json",
    "codex": ".codex/hooks.json",
    "gemini": ".gemini/settings.json",
    "cursor": ".cursor/hooks.json",
}
EVENT = {
    "claude": "PreToolUse",
    "codex": "PreToolUse",
    "gemini": "BeforeTool",
    "cursor": "beforeShellExecution",
}
MATCHER = {"claude": "Bash", "codex": "Bash", "gemini": "run_shell_command"}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("CLAUDE_CONFIG_DIR", raising=False)
    monkeypatch.delenv("CODEX_HOME", raising=False)
    return h


def run(*args: str) -> int:
    return airlock_main(["hook", *args])


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def commands(agent: str, data: Any) -> list[str]:
    """Every hook command of the agent's event, in order."""
    groups = data.get("hooks", {}).get(EVENT[agent], [])
    if agent == "cursor":
        return [g["command"] for g in groups]
    return [h["command"] for g in groups for h in g.get("hooks", [])]


def backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".airlock-backup-*"))


def existing(agent: str) -> dict[str, Any]:
    """A settings file a person already has: other settings, another hook for the same
    event, and hooks for other events."""
    if agent == "cursor":
        return {
            "version": 1,
            "hooks": {
                "beforeShellExecution": [{"command": "./audit.sh"}],
                "afterFileEdit": [{"command": "./format.sh"}],
            },
        }
    return {
        "model": "some-model",
        "permissions": {"allow": ["Read"]},
        "hooks": {
            EVENT[agent]: [
                {"matcher": MATCHER[agent], "hooks": [{"type": "command", "command": "./log.sh"}]},
                {"matcher": "Edit|Write", "hooks": [{"type": "command", "command": "./lint.sh"}]},
            ],
            "Stop": [{"hooks": [{"type": "command", "command": "./done.sh"}]}],
        },
    }


@pytest.mark.parametrize("agent", AGENTS)
def test_install_into_no_file_creates_it(home: Path, agent: str, capsys: Any) -> None:
    assert run("install", agent) == 0
    path = home / FILES[agent]
    data = load(path)
    (cmd,) = commands(agent, data)
    assert cmd.split()[-2:] == ["hook", agent] and cmd.split()[0].endswith("airlock")
    if agent == "cursor":
        assert data["version"] == 1
        assert list(data) == ["version", "hooks"]
    else:
        (group,) = data["hooks"][EVENT[agent]]
        assert group["matcher"] == MATCHER[agent]
        assert group["hooks"][0]["type"] == "command"
    assert backups(path) == []  # nothing to back up
    assert "installed" in capsys.readouterr().out


@pytest.mark.parametrize("agent", AGENTS)
def test_merge_keeps_everything_else_and_backs_up(home: Path, agent: str) -> None:
    path = home / FILES[agent]
    path.parent.mkdir()
    before = json.dumps(existing(agent), indent=4)
    path.write_text(before)
    os.chmod(path, 0o600)
    assert run("install", agent) == 0
    data = load(path)
    # Other settings and hooks are kept, Airlock's hook is added after them.
    old = existing(agent)
    for key in old:
        if key != "hooks":
            assert data[key] == old[key]
    for event, groups in old["hooks"].items():
        if event != EVENT[agent]:
            assert data["hooks"][event] == groups
    cmds = commands(agent, data)
    ours = [c for c in cmds if c.endswith(f"hook {agent}")]
    assert len(ours) == 1
    assert [c for c in cmds if c not in ours] == commands(agent, old)  # in their order
    if agent != "cursor":
        # Added to the existing group of the same matcher, not a second one.
        groups = data["hooks"][EVENT[agent]]
        assert [g["matcher"] for g in groups] == [MATCHER[agent], "Edit|Write"]
    (backup,) = backups(path)
    assert backup.read_text() == before  # the file as it was, byte for byte
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the mode is kept


@pytest.mark.parametrize("agent", AGENTS)
def test_second_install_changes_nothing(home: Path, agent: str, capsys: Any) -> None:
    path = home / FILES[agent]
    path.parent.mkdir()
    path.write_text(json.dumps(existing(agent)))
    assert run("install", agent) == 0
    after_first = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    capsys.readouterr()
    assert run("install", agent) == 0
    assert path.read_bytes() == after_first and path.stat().st_mtime_ns == mtime
    assert len(backups(path)) == 1  # no second backup either
    assert "nothing changed" in capsys.readouterr().out


@pytest.mark.parametrize("agent", AGENTS)
def test_uninstall_removes_exactly_that_entry(home: Path, agent: str) -> None:
    path = home / FILES[agent]
    path.parent.mkdir()
    path.write_text(json.dumps(existing(agent)))
    assert run("install", agent) == 0
    assert run("uninstall", agent) == 0
    assert load(path) == existing(agent)  # as before install, other hooks included
    assert len(backups(path)) == 2  # one per change
    assert run("uninstall", agent) == 0  # again: nothing to remove, nothing written
    assert len(backups(path)) == 2


@pytest.mark.parametrize("agent", AGENTS)
def test_uninstall_drops_the_group_and_keys_it_created(home: Path, agent: str) -> None:
    path = home / FILES[agent]
    path.parent.mkdir()
    original: dict[str, Any] = {"theme": "dark"}
    path.write_text(json.dumps(original))
    assert run("install", agent) == 0
    assert run("uninstall", agent) == 0
    data = load(path)
    if agent == "cursor":
        data.pop("version")  # Cursor's format version, which install added, may stay
    assert data == original


def test_uninstall_leaves_other_agents_and_foreign_airlock_lookalikes(home: Path) -> None:
    path = home / FILES["claude"]
    path.parent.mkdir()
    keep = [
        {"type": "command", "command": "airlock hook codex"},  # another agent's adapter
        {"type": "command", "command": "echo airlock hook claude"},  # not airlock itself
        {"type": "command", "command": "/opt/airlock-tools/check hook claude"},
    ]
    path.write_text(json.dumps({"hooks": {"PreToolUse": [{"matcher": "Bash", "hooks": keep}]}}))
    assert run("install", "claude") == 0
    assert run("uninstall", "claude") == 0
    assert load(path)["hooks"]["PreToolUse"] == [{"matcher": "Bash", "hooks": keep}]


def test_install_replaces_an_older_airlock_entry(home: Path) -> None:
    """An entry of an earlier install (another path, other flags) is updated, not doubled."""
    path = home / FILES["claude"]
    path.parent.mkdir()
    old = {"type": "command", "command": "/old/bin/airlock hook claude --timeout 5"}
    path.write_text(json.dumps({"hooks": {"PreToolUse": [{"matcher": "Bash", "hooks": [old]}]}}))
    assert run("install", "claude", "--socket", "/tmp/a.sock") == 0
    (cmd,) = commands("claude", load(path))
    assert cmd.endswith("hook claude --socket /tmp/a.sock")


@pytest.mark.parametrize("agent", AGENTS)
def test_project_file(home: Path, tmp_path: Path, agent: str) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    assert run("install", agent, "--project", str(project)) == 0
    assert (project / FILES[agent]).exists()
    assert not (home / FILES[agent]).exists()
    assert run("uninstall", agent, "--project", str(project)) == 0
    assert commands(agent, load(project / FILES[agent])) == []


@pytest.mark.parametrize(
    ("agent", "variable"), [("claude", "CLAUDE_CONFIG_DIR"), ("codex", "CODEX_HOME")]
)
def test_the_agents_own_directory_variable_is_followed(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agent: str, variable: str
) -> None:
    # The agent reads its user-level settings from the directory its variable names, so the
    # hook goes there; a project install is not moved by it.
    moved = tmp_path / "moved"
    monkeypatch.setenv(variable, str(moved))
    assert run("install", agent) == 0
    path = moved / Path(FILES[agent]).name
    assert len(commands(agent, load(path))) == 1
    assert not (home / FILES[agent]).exists()
    project = tmp_path / "proj"
    project.mkdir()
    assert run("install", agent, "--project", str(project)) == 0
    assert (project / FILES[agent]).exists()
    assert run("uninstall", agent) == 0
    assert commands(agent, load(path)) == []


MALFORMED = [
    "{not json",
    "[1, 2]",
    '{"hooks": []}',
    '{"hooks": {"EVENT": {"matcher": "x"}}}',
    '{"hooks": {"EVENT": ["x"]}}',
    '// a comment\n{"hooks": {}}',
]


@pytest.mark.parametrize("agent", AGENTS)
@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_file_is_refused_and_untouched(
    home: Path, agent: str, text: str, capsys: Any
) -> None:
    path = home / FILES[agent]
    path.parent.mkdir()
    text = text.replace("EVENT", EVENT[agent])
    path.write_text(text)
    for action in ("install", "uninstall"):
        assert run(action, agent) == 1
        assert path.read_text() == text
        assert "left as it was" in capsys.readouterr().err
    assert backups(path) == []
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file


def test_malformed_inner_hooks_list_is_refused(home: Path) -> None:
    path = home / FILES["gemini"]
    path.parent.mkdir()
    text = json.dumps({"hooks": {"BeforeTool": [{"matcher": "x", "hooks": {"a": 1}}]}})
    path.write_text(text)
    assert run("install", "gemini") == 1
    assert path.read_text() == text


def test_symlinked_settings_file_is_followed(home: Path, tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "settings.json"
    real.parent.mkdir()
    real.write_text('{"theme": "dark"}')
    link = home / FILES["claude"]
    link.parent.mkdir()
    link.symlink_to(real)
    assert run("install", "claude") == 0
    assert link.is_symlink()  # still a link: the file it points to was updated
    assert load(real)["theme"] == "dark" and commands("claude", load(real))


def test_timeouts_are_in_each_agents_unit(home: Path) -> None:
    for agent in ("claude", "codex", "gemini"):
        assert run("install", agent) == 0
    hook = {a: load(home / FILES[a])["hooks"][EVENT[a]][0]["hooks"][0] for a in MATCHER}
    assert hook["claude"]["timeout"] == 60 and hook["codex"]["timeout"] == 60  # seconds
    assert hook["gemini"]["timeout"] == 60_000  # milliseconds
    assert hook["gemini"]["name"] == "airlock"


def test_usage_errors() -> None:
    assert run("install") == 2
    assert run("install", "vim") == 2
    assert run("remove", "claude") != 0


def test_layout_matches_the_recorded_sources() -> None:
    """tests/data/hooks/install.json records where each agent's documentation puts the file,
    the event and the matcher; the code must agree with it."""
    recorded = json.loads((DATA / "install.json").read_text())["agents"]
    for agent in AGENTS:
        t = hookconf.target(agent)
        r = recorded[agent]
        assert str(t.path.relative_to(Path.home())) == r["user_file"].removeprefix("~/")
        assert t.event == r["event"]
        assert t.matcher == r.get("matcher")


# --- Codex: PreToolUse and PermissionRequest ------------------------------------------------


def codex_entries(data: Any) -> dict[str, list[tuple[str | None, str]]]:
    """(matcher, command) of every hook, by event."""
    return {
        event: [(g.get("matcher"), h["command"]) for g in groups for h in g.get("hooks", [])]
        for event, groups in data.get("hooks", {}).items()
    }


def test_codex_install_adds_both_events_and_uninstall_removes_both(home: Path) -> None:
    path = home / FILES["codex"]
    path.parent.mkdir()
    mine = {
        "hooks": {
            "PermissionRequest": [
                {"matcher": "Bash", "hooks": [{"type": "command", "command": "./notify.sh"}]}
            ],
            "Stop": [{"hooks": [{"type": "command", "command": "./done.sh"}]}],
        }
    }
    path.write_text(json.dumps(mine))
    assert run("install", "codex") == 0
    entries = codex_entries(load(path))
    (pre,) = entries["PreToolUse"]
    assert pre[0] == "Bash" and pre[1].endswith("hook codex")
    # Added to the person's own Bash group, after their hook; the same command and timeout.
    assert entries["PermissionRequest"] == [("Bash", "./notify.sh"), pre]
    assert load(path)["hooks"]["PermissionRequest"][0]["hooks"][1]["timeout"] == 60
    assert entries["Stop"] == [(None, "./done.sh")]
    assert run("install", "codex") == 0  # again: nothing changes
    assert len(backups(path)) == 1
    assert run("uninstall", "codex") == 0
    assert load(path) == mine
    assert len(backups(path)) == 2


def test_codex_install_over_a_pre_tool_use_only_install_adds_the_other(
    home: Path, capsys: Any
) -> None:
    """An install from before PermissionRequest was wired: the second event is added, the
    first left as it is, in one change with one backup."""
    path = home / FILES["codex"]
    path.parent.mkdir()
    assert run("install", "codex") == 0
    data = load(path)
    del data["hooks"]["PermissionRequest"]
    path.write_text(json.dumps(data, indent=2) + "\n")
    before = backups(path)
    capsys.readouterr()
    assert run("install", "codex") == 0
    assert "PreToolUse and PermissionRequest hooks" in capsys.readouterr().out
    after = load(path)
    assert after["hooks"]["PreToolUse"] == data["hooks"]["PreToolUse"]
    assert after["hooks"]["PermissionRequest"] == data["hooks"]["PreToolUse"]
    assert len(backups(path)) == len(before) + 1


def test_codex_uninstall_removes_a_lone_permission_request_entry(home: Path) -> None:
    path = home / FILES["codex"]
    path.parent.mkdir()
    ours = {"matcher": "Bash", "hooks": [{"type": "command", "command": "airlock hook codex"}]}
    path.write_text(json.dumps({"theme": "x", "hooks": {"PermissionRequest": [ours]}}))
    assert run("uninstall", "codex") == 0
    assert load(path) == {"theme": "x"}


def test_codex_malformed_permission_request_is_refused_and_untouched(
    home: Path, capsys: Any
) -> None:
    path = home / FILES["codex"]
    path.parent.mkdir()
    text = json.dumps({"hooks": {"PreToolUse": [], "PermissionRequest": {"matcher": "Bash"}}})
    path.write_text(text)
    for action in ("install", "uninstall"):
        assert run(action, "codex") == 1
        assert path.read_text() == text
        assert '"hooks.PermissionRequest" is not a list' in capsys.readouterr().err
    assert backups(path) == []


def test_more_events_match_the_recorded_sources() -> None:
    recorded = json.loads((DATA / "install.json").read_text())["agents"]
    for agent in AGENTS:
        t = hookconf.target(agent)
        assert list(t.more_events) == recorded[agent].get("more_events", [])
        assert t.events == (t.event, *t.more_events)
