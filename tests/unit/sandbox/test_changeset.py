"""An Apply conflict as an error: its gRPC status and its paths survive a pickle; the manifest's
canonical JSON (changesets on real overlays: tests/sandbox/test_changeset.py)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from airlock._errors import Conflict, InvalidRequest
from airlock.api.status import status_code_of
from airlock.sandbox import changeset
from airlock.sandbox.changeset import ChangeRecord, EntryState, Manifest, Tree
from airlock.sandbox.diff import DiffOptions, Layer, compute_changes
from airlock.types import ChangeKind, FileType


def test_conflict_is_aborted_and_keeps_its_paths() -> None:
    err = Conflict("changed", paths=(b"/w/a", b"/w/\xff"))
    assert status_code_of(err) is grpc.StatusCode.ABORTED
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.paths, copy.reason, copy.message) == (err.paths, "APPLY_CONFLICT", "changed")


# --- The manifest's canonical JSON ---------------------------------------------------------------

_INT = st.integers(0, 2**64)
_STATES = st.builds(
    EntryState,
    file_type=st.sampled_from(FileType),
    mode=_INT,
    uid=_INT,
    gid=_INT,
    size=_INT,
    sha256=st.one_of(st.just(""), st.text(max_size=70)),
    target=st.binary(max_size=20),
    fmt=_INT,
    rdev=_INT,
    tree=st.one_of(st.none(), st.builds(Tree, st.text(max_size=70), _INT)),
    offset=st.one_of(st.none(), _INT),
    ino=st.one_of(st.just(0), _INT),
    mtime_ns=_INT,
    ctime_ns=_INT,
    caps=st.binary(max_size=24),
)
_RECORDS = st.builds(
    ChangeRecord, st.binary(max_size=30), st.sampled_from(ChangeKind), _STATES, _STATES
)


@given(st.lists(_RECORDS, max_size=6), _INT, _INT)
def test_the_manifest_is_written_as_json_dumps_writes_it(
    records: list[ChangeRecord], content_bytes: int, created_ns: int
) -> None:
    # Manifest.to_json writes the canonical JSON directly (faster): byte for byte what the
    # documented form, json.dumps of the mapping with sorted keys, gives; any state, any path.
    manifest = Manifest(tuple(records), content_bytes, created_ns)
    expected = json.dumps(
        changeset._manifest_json(manifest),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode()
    assert manifest.to_json() == expected


def _record(path: bytes, kind: ChangeKind, before: FileType, after: FileType) -> ChangeRecord:
    def state(ftype: FileType, offset: int | None) -> EntryState:
        if ftype is FileType.REGULAR:
            return EntryState(ftype, sha256="0" * 64, offset=offset)
        if ftype is FileType.DIRECTORY and offset is None:  # before: its tree's digest
            return EntryState(ftype, tree=Tree("0" * 64, 1))
        return EntryState(ftype)

    return ChangeRecord(path, kind, state(before, None), state(after, 0))


def test_a_change_below_a_new_directory_or_a_file_is_refused_after_siblings() -> None:
    # The check finds the nearest listed ancestor once for changes in the same directory:
    # the later sibling is checked against it as well.
    none, regular, directory = FileType.NONE, FileType.REGULAR, FileType.DIRECTORY
    new_dir = _record(b"/w/d", ChangeKind.CREATED, none, directory)
    new_file = _record(b"/w/d/a", ChangeKind.CREATED, none, regular)
    gone = _record(b"/w/d/b", ChangeKind.DELETED, regular, none)  # existed below a new one
    changeset._check(Manifest((new_dir, new_file), 0, 1))
    with pytest.raises(InvalidRequest, match="below a new directory"):
        changeset._check(Manifest((new_dir, new_file, gone), 0, 1))
    replaced = _record(b"/w/f", ChangeKind.MODIFIED, directory, regular)
    below = (
        _record(b"/w/f/a", ChangeKind.DELETED, directory, none),
        _record(b"/w/f/b", ChangeKind.DELETED, directory, none),
    )
    with pytest.raises(InvalidRequest, match="not a directory afterwards"):
        changeset._check(Manifest((replaced, *below), 0, 1))
    elsewhere = _record(b"/w/e/b", ChangeKind.DELETED, regular, none)  # no ancestor listed
    changeset._check(Manifest((new_dir, new_file, elsewhere), 0, 1))


def test_a_layer_root_after_a_change_in_the_directory_holding_it(tmp_path: Path) -> None:
    # Two overlays, one mounted on a directory of the other. The inner one's root is listed
    # right after a change in the outer directory that holds it: it is still recorded from
    # its own layer (a mount point: its mode, before and after), not as an entry of the outer.
    outer_upper, outer_lower, inner_upper, inner_lower = (
        tmp_path / name for name in ("ou", "ol", "iu", "il")
    )
    for d in (outer_upper, outer_lower, inner_upper, inner_lower):
        d.mkdir(mode=0o755)
        d.chmod(0o755)
    inner_upper.chmod(0o700)  # the command changed the mount point's mode
    (outer_upper / "a").write_bytes(b"new\n")
    (inner_upper / "f").write_bytes(b"inner\n")
    host = os.fsencode(tmp_path / "host")
    layers = [
        Layer(host, os.fsencode(outer_upper), os.fsencode(outer_lower)),
        Layer(host + b"/b", os.fsencode(inner_upper), os.fsencode(inner_lower)),
    ]
    diff = compute_changes(layers, DiffOptions(workspace=host))
    assert [c.path for c in diff.changes] == [host + b"/a", host + b"/b", host + b"/b/f"]
    manifest = changeset.save(layers, diff, str(tmp_path / "kept"), quota_bytes=1 << 20)
    root = manifest.changes[1]
    assert (root.path, root.kind) == (host + b"/b", ChangeKind.METADATA_CHANGED)
    assert (root.before.mode, root.after.mode) == (0o755, 0o700)
    assert [c.after.file_type for c in manifest.changes] == [
        FileType.REGULAR,
        FileType.DIRECTORY,
        FileType.REGULAR,
    ]
