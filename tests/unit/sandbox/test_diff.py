"""compute_changes without a mount (the diff of real overlays: tests/sandbox/test_diff.py); its
result on the wire and the changeset saved from the content it read."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from airlock.sandbox import _wire
from airlock.sandbox import diff as diff_module
from airlock.sandbox.changeset import CONTENT_NAME, MANIFEST_NAME, save
from airlock.sandbox.diff import DiffOptions, Layer, compute_changes, diff_result_from_rows


def test_upper_must_exist(tmp_path: Path) -> None:
    from airlock import SandboxError

    layer = Layer(b"/", os.fsencode(tmp_path / "missing"), b"/")
    with pytest.raises(SandboxError):
        compute_changes([layer], DiffOptions(workspace=b"/"))


def _layer_with_new_files(tmp_path: Path) -> Layer:
    """An upper with new files (text, binary, empty, a non-UTF-8 name, one in a new
    directory), a rewritten one and a symbolic link; a lower with the rewritten file."""
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    (upper / "sub").mkdir(parents=True)
    lower.mkdir()
    (upper / "a.txt").write_text("one\ntwo\n")
    (upper / "blob").write_bytes(b"\0MARKER-not-in-the-pickle\xff")
    (upper / "empty").write_bytes(b"")
    (upper / "sub" / "deep").write_text("x" * 100)
    with open(os.path.join(os.fsencode(upper), b"\xffname"), "wb") as f:
        f.write(b"raw")
    (lower / "old").write_text("before\n")
    (upper / "old").write_text("after\n")
    (upper / "link").symlink_to("a.txt")
    return Layer(b"/ws", os.fsencode(upper), os.fsencode(lower))


def test_a_result_crosses_the_wire_exactly_and_without_the_content(tmp_path: Path) -> None:
    result = compute_changes([_layer_with_new_files(tmp_path)], DiffOptions(workspace=b"/ws"))
    assert result.contents[b"/ws/blob"] == b"\0MARKER-not-in-the-pickle\xff"
    data = _wire.dumps(result)
    assert b"MARKER" not in data  # binary: no diff of it either
    back = _wire.loads(data[_wire.HEADER_BYTES :])
    assert back == result and back.changes == result.changes
    assert [vars(c) for c in back.changes] == [vars(c) for c in result.changes]
    assert back.contents == {}
    with pytest.raises(ValueError):
        diff_result_from_rows(((b"/x", 1),), False, 0)  # a row of another shape
    # Rows are read by a function written out for FileChange's fields, when it is equivalent.
    assert diff_module._row_fields is diff_module._row_fields_now
    row = result.__reduce__()[1][0][0]  # type: ignore[index]
    assert diff_result_from_rows((row,), False, 0).changes == (result.changes[0],)
    for at in (1, 2, 3, 18):  # kind, file types, other type: an unknown value is refused
        for bad in (99, -1, "1", None, [1]):
            with pytest.raises(ValueError):
                diff_result_from_rows(((*row[:at], bad, *row[at + 1 :]),), False, 0)


def test_new_content_is_kept_as_read_and_only_up_to_content_for(tmp_path: Path) -> None:
    layer = _layer_with_new_files(tmp_path)
    kept = compute_changes([layer], DiffOptions(workspace=b"/ws")).contents
    assert kept == {
        b"/ws/a.txt": b"one\ntwo\n",
        b"/ws/blob": b"\0MARKER-not-in-the-pickle\xff",
        b"/ws/empty": b"",
        b"/ws/sub/deep": b"x" * 100,
        b"/ws/\xffname": b"raw",
    }  # not the rewritten file, the link or the directory
    changes = len(compute_changes([layer], DiffOptions(workspace=b"/ws")).changes)
    for content_for in (0, changes - 1):
        options = DiffOptions(workspace=b"/ws", content_for=content_for)
        assert compute_changes([layer], options).contents == {}
    options = DiffOptions(workspace=b"/ws", content_for=changes)
    assert compute_changes([layer], options).contents == kept


def test_a_changeset_from_the_diffs_content_is_the_one_copied_from_the_files(
    tmp_path: Path,
) -> None:
    layer = _layer_with_new_files(tmp_path)
    result = compute_changes([layer], DiffOptions(workspace=b"/ws"))
    assert result.contents
    saved = {}
    for name, diff in (("read", result), ("copied", dataclasses.replace(result, contents={}))):
        dest = tmp_path / name
        manifest = save([layer], diff, str(dest), quota_bytes=1 << 20)
        text = json.loads((dest / MANIFEST_NAME).read_bytes())
        text["created_ns"] = 0
        saved[name] = (text, (dest / CONTENT_NAME).read_bytes(), manifest.content_bytes)
    assert saved["read"] == saved["copied"]
