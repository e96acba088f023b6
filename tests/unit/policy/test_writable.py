"""Filesystem grants: the ``writable_paths`` and ``writable_presets`` keys (schema, lint,
presets) and the ``granted`` scope effect rules see (tests/daemon/test_writable_paths.py runs
them against a real daemon)."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from airlock.core.engine import granted_paths
from airlock.policy.effects import ChangeScope, change_scope
from airlock.policy.loader import PolicyBundle, PolicyError, load_bundle
from airlock.policy.store import default_policy_dir
from airlock.types import ChangeKind, Effects, FileChange, FileType


def bundle(tmp_path: Path, text: str) -> PolicyBundle:
    (tmp_path / "p.yaml").write_text(textwrap.dedent(text))
    return load_bundle(tmp_path)


def problems(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "p.yaml").write_text(textwrap.dedent(text))
    with pytest.raises(PolicyError) as e:
        load_bundle(tmp_path)
    return [p.message for p in e.value.problems]


def test_paths_and_presets_are_the_union_normalised(tmp_path: Path) -> None:
    b = bundle(
        tmp_path,
        """\
        version: 1
        writable_presets:
          caches: {description: some caches, paths: [~/.npm/, ~/.cache/pip]}
        writable_paths: {presets: [caches], paths: [~/.cache/pip, ~/go/pkg/mod]}
        """,
    )
    assert b.writable_paths == ("~/.cache/pip", "~/.npm", "~/go/pkg/mod")
    assert b.writable_presets == (("caches", "some caches"),)


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/var/cache/pip", "not below the home directory"),
        ("~", "not below the home directory"),
        ("~/", "not a plain directory"),
        ("~/../etc", "not a plain directory"),
        ("~/.cache/./pip", "not a plain directory"),
        ("~/.cache//pip", "not a plain directory"),
        ("~/.cache/*", "glob character"),
        ("~root/.cache", "not below the home directory"),
    ],
)
def test_a_grant_is_one_plain_directory_below_the_home(
    tmp_path: Path, path: str, words: str
) -> None:
    got = problems(tmp_path, f"version: 1\nwritable_paths: {{paths: [{path!r}]}}\n")
    assert len(got) == 1 and words in got[0], got


def test_an_unknown_preset_names_the_defined_ones(tmp_path: Path) -> None:
    got = problems(tmp_path, "version: 1\nwritable_paths: {presets: [nope]}\n")
    assert got == ["unknown writable preset 'nope'"], got


def test_the_shipped_preset_is_off_until_switched_on_in_one_line(tmp_path: Path) -> None:
    shipped = load_bundle(default_policy_dir())
    assert shipped.writable_paths == ()
    assert [name for name, _ in shipped.writable_presets] == ["package-caches"]
    policy = tmp_path / "policy"
    shutil.copytree(default_policy_dir(), policy / "default")
    (policy / "caches.yaml").write_text("version: 1\nwritable_paths: {presets: [package-caches]}\n")
    on = load_bundle(policy)
    assert {"~/.cache/pip", "~/.npm", "~/.cargo/registry"} <= set(on.writable_paths)
    assert on.warnings == ()


def change(path: str, *, in_workspace: bool = False) -> FileChange:
    return FileChange(
        path=path.encode(),
        kind=ChangeKind.CREATED,
        file_type=FileType.REGULAR,
        in_workspace=in_workspace,
    )


def test_changes_below_a_grant_are_granted_not_home() -> None:
    granted = granted_paths(("~/.cache/pip",), "/home/u/")
    assert granted == ("/home/u/.cache/pip",)
    assert granted_paths(("~/.cache/pip",), "/") == ()  # no usable home: no grant
    scope = {
        p: change_scope(change(p), "/home/u", granted)
        for p in (
            "/home/u/.cache/pip",
            "/home/u/.cache/pip/http/x",
            "/home/u/.cache/pipx/x",
            "/home/u/.bashrc",
        )
    }
    assert scope == {
        "/home/u/.cache/pip": ChangeScope.GRANTED,
        "/home/u/.cache/pip/http/x": ChangeScope.GRANTED,
        "/home/u/.cache/pipx/x": ChangeScope.HOME,
        "/home/u/.bashrc": ChangeScope.HOME,
    }
    ws = change("/home/u/.cache/pip/x", in_workspace=True)
    assert change_scope(ws, "/home/u", granted) is ChangeScope.WORKSPACE


def test_the_shipped_home_write_rule_asks_about_a_cache_only_without_its_grant() -> None:
    shipped = load_bundle(default_policy_dir())
    cache = (change("/home/u/.cache/pip/http/x"),)
    bare = Effects(workspace="/w", home="/home/u", changes=cache)
    assert [f.rule_id for f in shipped.judge_effects(bare)] == ["effect.home-write"]
    with_grant = Effects(
        workspace="/w", home="/home/u", changes=cache, granted=("/home/u/.cache/pip",)
    )
    assert shipped.judge_effects(with_grant) == ()
    # A grant covers its directory only: a shell start-up file still asks and denies.
    rc = (change("/home/u/.bashrc"), change("/home/u/.cache/pip/x"))
    judged = shipped.judge_effects(
        Effects(workspace="/w", home="/home/u", changes=rc, granted=("/home/u/.cache/pip",))
    )
    assert "effect.shell-startup-write" in [f.rule_id for f in judged]
