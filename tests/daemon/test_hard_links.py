"""Hard links a dry run makes to files the caller does not own (issue 14, blind spot 4).

A real daemon with the shipped default policy and real users. In the dry run's overlay,
``ln`` copies the target up and links the copy, so the new name is reported CREATED with its
owner (``uid_after``), its number of names (``links``) and another name (``linked_to``).
``effect.foreign-hard-link`` asks when the linked file belongs to another user, or when its
other name is a system file (root's ``ln /etc/...``); a link to the caller's own file is a
workspace change like any other. fs.protected_hardlinks=1 (this VM) lets a user link only a
file they own or may read and write; the sandbox runs root without capabilities, so root
too links another user's file only when it may read and write it (mode 0666 here). The host
is never changed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock.client import Client
from airlock.types import Validation, Verdict
from tests.helpers import public_dir
from tests.helpers.users import run_client_as, temporary_user

RULE = "effect.foreign-hard-link"


@pytest.fixture
def alice() -> Iterator[tuple[int, Path]]:
    """A real user whose home holds ``notes`` (0666: anyone may write it) and ``private``
    (0600): her uid and home (in a directory every user may traverse)."""
    with public_dir() as base, temporary_user(base / "alice") as (uid, gid):
        home = base / "alice"
        for name, mode in (("notes", 0o666), ("private", 0o600)):
            path = home / name
            path.write_text(f"alice's {name}\n")
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        yield uid, home


def workspace(parent: Path, uid: int = 0) -> Path:
    ws = parent / f"ws-{uid}"
    ws.mkdir(mode=0o755)
    os.chown(ws, uid, uid)
    (ws / "mine").write_text("mine\n")
    os.chown(ws / "mine", uid, uid)
    return ws


def finding(v: Validation) -> str:
    found = [f.message for f in v.findings if f.rule_id == RULE]
    return found[0] if found else ""


def test_root_linking_another_users_file_asks_naming_it(
    client: Client, alice: tuple[int, Path]
) -> None:
    uid, home = alice
    ws = workspace(home.parent)
    v = client.validate(f"ln {home}/notes y", cwd=str(ws))
    assert v.exit_code == 0, v.stderr
    y = next(c for c in v.changes if c.path == os.fsencode(f"{ws}/y"))
    assert y.uid_after == uid  # the link is alice's file
    assert (y.links, y.linked_to) == (2, os.fsencode(f"{home}/notes"))
    assert v.verdict is Verdict.ASK
    assert finding(v) == (
        "Makes a hard link to a file of another user or of the system: "
        f"{ws}/y (created, hard link to {home}/notes, owner uid {uid})"
    )
    assert not (ws / "y").exists()
    assert os.stat(home / "notes").st_nlink == 1


def test_root_linking_a_system_file_asks_naming_it(client: Client, tmp_path: Path) -> None:
    """Root owns /etc/login.defs: the owner is the caller, but the other name is a system
    file: editing ./defs would edit the system's."""
    os.chmod(tmp_path, 0o755)
    ws = workspace(tmp_path)
    v = client.validate("ln /etc/login.defs defs", cwd=str(ws))
    assert v.exit_code == 0, v.stderr
    assert v.verdict is Verdict.ASK
    assert finding(v) == (
        "Makes a hard link to a file of another user or of the system: "
        f"{ws}/defs (created, hard link to /etc/login.defs, owner uid 0)"
    )


def test_root_linking_its_own_files_is_no_finding(client: Client, tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    ws = workspace(tmp_path)
    v = client.validate("ln mine mine2 && echo new > a && ln a b", cwd=str(ws))
    assert v.exit_code == 0, v.stderr
    links = {os.path.basename(c.path): (c.links, c.linked_to) for c in v.changes}
    assert links == {
        b"mine2": (2, os.fsencode(f"{ws}/mine")),  # mine, copied up, is no change
        b"a": (2, os.fsencode(f"{ws}/b")),
        b"b": (2, os.fsencode(f"{ws}/a")),
    }
    assert not finding(v)
    assert v.verdict is Verdict.ALLOW, v.findings


def validate_as(client: Client, uid: int, command: str, cwd: Path) -> tuple[str, int, str, str]:
    proc = run_client_as(
        f"with Client({client.socket_path!r}) as c:\n"
        f"    v = c.validate({command!r}, cwd={str(cwd)!r})\n"
        f"    m = [f.message for f in v.findings if f.rule_id == {RULE!r}]\n"
        "    print(json.dumps([v.verdict.name, v.exit_code, m[0] if m else '',"
        " v.stderr.decode()]))\n",
        uid=uid,
    )
    assert proc.returncode == 0, proc.stderr
    verdict, code, message, stderr = json.loads(proc.stdout)
    return verdict, code, message, stderr


def test_a_user_linking_anothers_writable_file_asks(
    client: Client, alice: tuple[int, Path]
) -> None:
    alice_uid, home = alice
    with temporary_user(home.parent / "bob") as (bob, _gid):
        ws = workspace(home.parent / "bob", bob)
        verdict, code, message, stderr = validate_as(client, bob, f"ln {home}/notes y", ws)
        assert code == 0, stderr
        assert verdict == "ASK"
        assert f"{ws}/y (created, hard link to {home}/notes, owner uid {alice_uid})" in message
        # Her private file: fs.protected_hardlinks refuses the link; nothing to judge.
        verdict, code, message, stderr = validate_as(client, bob, f"ln {home}/private z", ws)
        assert code != 0 and "Operation not permitted" in stderr
        assert not message
        # His own file: no finding.
        verdict, code, message, stderr = validate_as(client, bob, "ln mine mine2", ws)
        assert code == 0, stderr
        assert (verdict, message) == ("ALLOW", "")
        assert not (ws / "y").exists() and not (ws / "mine2").exists()
