"""The ``files`` keys ``hard_link``, ``owner`` and ``link_scope`` of effect rules, on real
policies loaded from files and hand-made effects (what the dry run reports: tests/sandbox/
test_diff.py and tests/daemon/test_hard_links.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from airlock.policy.loader import PolicyError, load_bundle
from airlock.types import ChangeKind, Effects, FileChange, FileType

WS = "/home/bob/proj"


def bundle(tmp_path: Path, files: str) -> object:
    (tmp_path / "p.yaml").write_text(
        textwrap.dedent(
            f"""\
            version: 1
            rules:
              - id: t.rule
                title: t
                description: t
                decision: ask
                severity: low
                effect:
                  files: {files}
            """
        )
    )
    return load_bundle(tmp_path)


def change(name: str, uid: int | None = 1000, links: int = 0, linked_to: str = "") -> FileChange:
    return FileChange(
        path=f"{WS}/{name}".encode(),
        kind=ChangeKind.CREATED,
        file_type=FileType.REGULAR,
        in_workspace=True,
        uid_after=uid,
        links=links,
        linked_to=linked_to.encode(),
    )


def fired(b: object, *changes: FileChange, uid: int | None = 1000) -> str:
    effects = Effects(workspace=WS, home="/home/bob", changes=changes, uid=uid)
    found = b.judge_effects(effects)  # type: ignore[attr-defined]
    return found[0].message if found else ""


def test_hard_link(tmp_path: Path) -> None:
    b = bundle(tmp_path, "{hard_link: true}")
    assert fired(b, change("a")) == ""
    assert fired(b, change("b", links=2, linked_to=f"{WS}/a")) == (
        f"t: {WS}/b (created, hard link to {WS}/a, owner uid 1000)"
    )
    assert fired(bundle(tmp_path, "{hard_link: false}"), change("a")) == f"t: {WS}/a (created)"


def test_owner_unknown_counts_as_another_user(tmp_path: Path) -> None:
    other = bundle(tmp_path, "{owner: other}")
    assert fired(other, change("a")) == ""
    assert fired(other, change("a", uid=1001))
    assert fired(other, change("a", uid=None))  # the file's owner is not known
    assert fired(other, change("a"), uid=None)  # the caller is not known
    caller = bundle(tmp_path, "{owner: caller}")
    assert fired(caller, change("a"))
    assert fired(caller, change("a", uid=None)) == ""


def test_link_scope(tmp_path: Path) -> None:
    b = bundle(tmp_path, "{link_scope: [system]}")
    assert fired(b, change("x", uid=0, links=2, linked_to="/etc/shadow"), uid=0)
    assert fired(b, change("x", links=2, linked_to=f"{WS}/y")) == ""  # in the workspace
    assert fired(b, change("x", links=2, linked_to="/home/bob/.cache/x")) == ""  # home
    assert fired(b, change("x", links=2, linked_to="/tmp/x")) == ""  # temp
    assert fired(b, change("x", links=2)) == ""  # the other name was not seen
    assert fired(b, change("x", linked_to="/etc/shadow")) == ""  # one name: no link


def test_bad_values_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        bundle(tmp_path, "{owner: someone}")
    assert "'someone' is not one of caller, other" in str(info.value)
    with pytest.raises(PolicyError):
        bundle(tmp_path, "{link_scope: [elsewhere]}")
