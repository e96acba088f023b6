"""A caller never reads, through a dry run's report or its Apply, content it could not read.

Each test builds a workspace owned by uid 65534 (under ``public_tmp``) holding a secret the
caller may not read, runs a command through a real daemon as that real non-root user, and
checks that the secret's bytes and its SHA-256 appear nowhere in the whole response (the
serialized ``ValidateResponse``, stdout and stderr included: the command itself could not
read the secret), nor in the changes kept for Apply, and that Apply, tried as the caller, puts
the secret into no other file of the host. The change itself is reported, marked
``unreadable``. What the caller may read (its own group's files) is still shown in full, and
a root caller sees everything as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from airlock.client import Client
from airlock.types import ChangeKind
from tests.helpers import CLIENT_PRELUDE, NEUTRAL_POLICY, NOBODY, Daemon, mount_table

# Callers approve their own asks here: allow-self-approval (test_approvals.py has the rule).
DAEMON_ARGS = (*NEUTRAL_POLICY, "--allow-self-approval")

OTHER_USER = 4321  # another user, who owns nothing of the caller's
CALLER_GROUP = 4242  # a supplementary group of the caller (in the group test)
FOREIGN_GROUP = 4343  # a group the caller is not in


def new_secret() -> bytes:
    return b"TOP-SECRET-" + secrets.token_hex(12).encode() + b"\n"


def write(path: Path, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> None:
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


@pytest.fixture
def ws(public_tmp: Path) -> Path:
    """The caller's workspace: owned by 65534, under a directory everyone may search."""
    path = public_tmp / "ws"
    path.mkdir()
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, 0o755)
    return path


# --- Running the client as the caller -------------------------------------------------------


@dataclass
class Report:
    raw: bytes  # the serialized ValidateResponse
    validation_id: str
    verdict: str
    digest: str
    not_kept: str
    changes: dict[str, dict[str, Any]]  # by path relative to the workspace


def _client_as(body: str, groups: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``body`` as uid/gid 65534 with supplementary ``groups`` (see run_client_as)."""
    prelude = CLIENT_PRELUDE.format(uid=NOBODY)
    assert "os.setgroups([])" in prelude
    prelude = prelude.replace("os.setgroups([])", f"os.setgroups({list(groups)!r})")
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def validate_as_caller(
    daemon: Daemon, ws: Path, command: str, groups: tuple[int, ...] = ()
) -> Report:
    proc = _client_as(
        f"""
        from airlock.api.convert import validation_from_proto
        with Client({daemon.socket!r}) as c:
            raw = c.validate_raw({command!r}, cwd={str(ws)!r})
        v = validation_from_proto(raw)
        prefix = {str(ws) + "/"!r}
        print(json.dumps({{
            "raw": raw.SerializeToString().hex(),
            "id": v.validation_id,
            "verdict": v.verdict.name,
            "digest": v.changes_digest,
            "not_kept": v.changes_not_kept,
            "changes": {{
                ch.path.decode().removeprefix(prefix): {{
                    "kind": ch.kind.name,
                    "sha256": ch.sha256_after,
                    "diff": ch.unified_diff,
                    "unreadable": getattr(ch, "unreadable", None),
                }}
                for ch in v.changes
            }},
        }}))
        """,
        groups,
    )
    out = json.loads(proc.stdout)
    return Report(
        raw=bytes.fromhex(out["raw"]),
        validation_id=out["id"],
        verdict=out["verdict"],
        digest=out["digest"],
        not_kept=out["not_kept"],
        changes=out["changes"],
    )


def apply_as_caller(daemon: Daemon, report: Report, groups: tuple[int, ...] = ()) -> list[Any]:
    """Approve (if asked) and apply as the caller: ["applied", paths] or [error, reason]."""
    proc = _client_as(
        f"""
        with Client({daemon.socket!r}) as c:
            try:
                if {report.verdict!r} == "ASK":
                    c.approve({report.validation_id!r})
                done = c.apply({report.validation_id!r})
                out = ["applied", [p.decode() for p in done.applied_paths]]
            except AirlockError as e:
                out = [type(e).__name__, e.reason]
        print(json.dumps(out))
        """,
        groups,
    )
    result: list[Any] = json.loads(proc.stdout)
    return result


# --- What must hold in every scenario ---------------------------------------------------------


def host_files(root: Path) -> dict[str, bytes]:
    out = {}
    for top, _dirs, files in os.walk(root):
        for name in files:
            path = Path(top) / name
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(root))] = path.read_bytes()
    return out


def assert_not_reported(daemon: Daemon, report: Report, hidden: dict[str, bytes]) -> None:
    """``hidden`` maps each secret's home (relative to the workspace) to its bytes.

    Neither the bytes nor their SHA-256 are in the response or in the kept changeset.
    """
    kept = Path(daemon.state_dir) / "changesets" / report.validation_id
    stored = b"".join(p.read_bytes() for p in kept.iterdir()) if kept.is_dir() else b""
    for secret in hidden.values():
        digest = hashlib.sha256(secret).hexdigest().encode()
        for where, data in (("the response", report.raw), ("the kept changeset", stored)):
            assert secret.strip() not in data, f"the secret is in {where}"
            assert digest not in data, f"the secret's SHA-256 is in {where}"


def assert_apply_writes_no_secret(
    daemon: Daemon,
    ws: Path,
    report: Report,
    hidden: dict[str, bytes],
    groups: tuple[int, ...] = (),
) -> None:
    """Apply, tried as the caller, leaves no secret in any other file of the host."""
    outcome = apply_as_caller(daemon, report, groups)
    for rel, data in host_files(ws).items():
        for home, secret in hidden.items():
            if rel != home:
                assert secret.strip() not in data, f"Apply ({outcome}) wrote the secret to {rel}"


def assert_unreadable(change: dict[str, Any]) -> None:
    """A change whose content the caller could not read: flagged, with no diff."""
    assert change["unreadable"] is True, change
    assert change["diff"] == "", change


def assert_not_kept(report: Report) -> None:
    assert not report.digest, "changes the caller could not read were kept for Apply"
    assert "CHANGES_UNREADABLE" in report.not_kept, report.not_kept


# --- The scenarios ------------------------------------------------------------------------------


def test_replaced_file(daemon: Daemon, ws: Path) -> None:
    secret = new_secret()
    write(ws / "secret.txt", secret, 0o600)
    report = validate_as_caller(
        daemon, ws, "cat secret.txt; rm -f secret.txt; echo new > secret.txt"
    )
    hidden = {"secret.txt": secret}
    assert_not_reported(daemon, report, hidden)
    change = report.changes["secret.txt"]
    assert change["kind"] == ChangeKind.MODIFIED.name
    assert_unreadable(change)
    # The new content is the caller's own: its hash may be shown.
    assert change["sha256"] == hashlib.sha256(b"new\n").hexdigest()
    assert_not_kept(report)
    assert_apply_writes_no_secret(daemon, ws, report, hidden)
    assert (ws / "secret.txt").read_bytes() == secret


def test_replacing_with_equal_bytes_is_no_oracle(daemon: Daemon, ws: Path) -> None:
    """Writing a guess of the same size: the report must not say whether it was right."""
    secret = new_secret()
    wrong = secret[:-2] + (b"x" if secret[-2:-1] != b"x" else b"y") + b"\n"
    seen = []
    for guess in (secret, wrong):
        write(ws / "secret.txt", secret, 0o600)
        report = validate_as_caller(
            daemon, ws, f"rm -f secret.txt; printf '%s' '{guess.decode()}' > secret.txt"
        )
        change = report.changes.get("secret.txt", {})
        seen.append((change.get("kind"), change.get("diff")))
    assert seen[0] == seen[1] == (ChangeKind.MODIFIED.name, "")


def test_renamed_file(daemon: Daemon, ws: Path) -> None:
    secret = new_secret()
    write(ws / "secret.txt", secret, 0o600)
    report = validate_as_caller(daemon, ws, "mv secret.txt moved.txt")
    hidden = {"secret.txt": secret}
    assert_not_reported(daemon, report, hidden)
    moved = report.changes["moved.txt"]
    assert moved["kind"] == ChangeKind.CREATED.name
    assert_unreadable(moved)
    assert moved["sha256"] == ""
    assert report.changes["secret.txt"]["kind"] == ChangeKind.DELETED.name
    assert_not_kept(report)
    assert_apply_writes_no_secret(daemon, ws, report, hidden)
    assert not (ws / "moved.txt").exists()


def test_deleted_file(daemon: Daemon, ws: Path) -> None:
    """Nothing of a deleted file is shown; keeping it would store the hash of its content."""
    secret = new_secret()
    write(ws / "secret.txt", secret, 0o600)
    report = validate_as_caller(daemon, ws, "rm -f secret.txt")
    hidden = {"secret.txt": secret}
    assert_not_reported(daemon, report, hidden)
    assert report.changes["secret.txt"]["kind"] == ChangeKind.DELETED.name
    assert_not_kept(report)
    assert_apply_writes_no_secret(daemon, ws, report, hidden)
    assert (ws / "secret.txt").read_bytes() == secret


def test_hard_link(daemon: Daemon, ws: Path) -> None:
    # fs.protected_hardlinks lets a user link only a file it owns or may read and write: the
    # secret is the caller's own, but write-only (mode 0200): the caller may not read it.
    secret = new_secret()
    write(ws / "secret.txt", secret, 0o200, NOBODY, NOBODY)
    report = validate_as_caller(daemon, ws, "ln secret.txt l; cat l")
    hidden = {"secret.txt": secret}
    assert_not_reported(daemon, report, hidden)
    link = report.changes["l"]
    assert link["kind"] == ChangeKind.CREATED.name
    assert_unreadable(link)
    assert link["sha256"] == ""
    assert_not_kept(report)
    assert_apply_writes_no_secret(daemon, ws, report, hidden)
    assert not (ws / "l").exists()


def test_copy_up_by_chmod_touch_and_append(daemon: Daemon, ws: Path) -> None:
    own, drop, touched = new_secret(), new_secret(), new_secret()
    write(ws / "own.txt", own, 0o200, NOBODY, NOBODY)  # the caller's, write-only
    write(ws / "drop.txt", drop, 0o622)  # root's, writable by all, readable by root only
    write(ws / "touched.txt", touched, 0o622)
    report = validate_as_caller(
        daemon, ws, "chmod 0220 own.txt; echo appended >> drop.txt; touch touched.txt"
    )
    hidden = {"own.txt": own, "drop.txt": drop, "touched.txt": touched}
    assert_not_reported(daemon, report, hidden)
    for name in ("own.txt", "drop.txt", "touched.txt"):
        change = report.changes[name]
        # The content could not be compared: it may have changed.
        assert change["kind"] == ChangeKind.MODIFIED.name, (name, change)
        assert_unreadable(change)
        assert change["sha256"] == ""
    assert_not_kept(report)
    assert_apply_writes_no_secret(daemon, ws, report, hidden)
    assert (ws / "drop.txt").read_bytes() == drop


def test_through_a_symlink(daemon: Daemon, ws: Path) -> None:
    secret = new_secret()
    write(ws / "secret.txt", secret, 0o622)
    report = validate_as_caller(
        daemon, ws, "ln -s secret.txt link; cat link; echo appended >> link"
    )
    hidden = {"secret.txt": secret}
    assert_not_reported(daemon, report, hidden)
    assert report.changes["link"]["kind"] == ChangeKind.CREATED.name
    assert report.changes["link"]["unreadable"] is False  # a link's target is no content
    change = report.changes["secret.txt"]
    assert change["kind"] == ChangeKind.MODIFIED.name
    assert_unreadable(change)
    assert change["sha256"] == ""
    assert_not_kept(report)
    assert_apply_writes_no_secret(daemon, ws, report, hidden)
    assert (ws / "secret.txt").read_bytes() == secret


def test_group_readable_files_are_shown_to_the_group_only(daemon: Daemon, ws: Path) -> None:
    primary, supplementary, foreign = new_secret(), new_secret(), new_secret()
    write(ws / "primary.txt", primary, 0o640, 0, NOBODY)  # the caller's own gid
    write(ws / "supplementary.txt", supplementary, 0o640, 0, CALLER_GROUP)
    write(ws / "foreign.txt", foreign, 0o640, 0, FOREIGN_GROUP)
    groups = (CALLER_GROUP,)
    report = validate_as_caller(
        daemon, ws, "mv primary.txt p2; mv supplementary.txt s2; mv foreign.txt f2", groups
    )
    hidden = {"foreign.txt": foreign}
    assert_not_reported(daemon, report, hidden)
    for name, content in (("p2", primary), ("s2", supplementary)):
        change = report.changes[name]
        assert change["unreadable"] is False, change
        assert "+" + content.decode() in change["diff"]
        assert change["sha256"] == hashlib.sha256(content).hexdigest()
    assert_unreadable(report.changes["f2"])
    assert report.changes["f2"]["sha256"] == ""
    assert_not_kept(report)
    assert_apply_writes_no_secret(daemon, ws, report, hidden, groups)


def test_another_users_private_directory(daemon: Daemon, ws: Path) -> None:
    """Nothing the command tries reaches below a 0700 directory of another user."""
    secret = new_secret()
    vault = ws / "vault"
    vault.mkdir()
    write(vault / "notes.txt", secret, 0o644, OTHER_USER, OTHER_USER)
    os.chown(vault, OTHER_USER, OTHER_USER)
    os.chmod(vault, 0o700)
    report = validate_as_caller(
        daemon,
        ws,
        "cat vault/notes.txt; mv vault v2; cp -r vault copy; rm -rf vault;"
        " ln vault/notes.txt l; ln -s vault/notes.txt s; cat s; echo x >> s; true",
    )
    hidden = {"vault/notes.txt": secret}
    assert_not_reported(daemon, report, hidden)
    assert "s" in report.changes
    assert_apply_writes_no_secret(daemon, ws, report, hidden)


def test_root_caller_sees_everything_as_before(client: Client, ws: Path) -> None:
    os.chown(ws, 0, 0)  # root in the sandbox has no capabilities: its workspace is its own
    secret = new_secret()
    write(ws / "secret.txt", secret, 0o600)
    v = client.validate("mv secret.txt moved.txt", cwd=str(ws))
    moved = {c.path: c for c in v.changes}[os.fsencode(ws / "moved.txt")]
    assert not moved.unreadable
    assert "+" + secret.decode() in moved.unified_diff
    assert moved.sha256_after == hashlib.sha256(secret).hexdigest()
    assert v.changes_digest and not v.changes_not_kept


# --- Below a directory the caller cannot search (the diff alone) ------------------------------

# A change below another user's 0700 directory cannot be made by a non-root command (the
# kernel checks the path); this plants one in an overlay's upper layer as root and diffs it
# for the caller: a 0644 file there is no more readable for the caller than through the path.
_PLANTED = textwrap.dedent(
    """
    import os, pickle, subprocess, sys
    from airlock.sandbox.diff import Caller, DiffOptions, Layer, compute_changes
    from airlock.sandbox.changeset import save

    base, secret = sys.argv[1], sys.argv[2].encode()
    host, scratch = f"{base}/host", f"{base}/scratch"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=755", "tmpfs", scratch],
                   check=True)
    upper, work, merged = (f"{scratch}/{d}" for d in ("u", "w", "m"))
    for d in (upper, work, merged):
        os.mkdir(d)
    os.chmod(upper, 0o755)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={host},upperdir={upper},workdir={work},"
                    "redirect_dir=off,index=off,metacopy=off,xino=off", merged], check=True)
    with open(f"{merged}/vault/sub/new.txt", "wb") as f:
        f.write(secret)
    with open(f"{merged}/vault/sub/old.txt", "ab") as f:
        f.write(b"more")
    os.chmod(f"{merged}/vault/sub/new.txt", 0o644)
    layer = Layer(host.encode(), upper.encode(), host.encode())
    caller = Caller(uid=65534, gid=65534, groups=())
    diff = compute_changes([layer], DiffOptions(workspace=host.encode()), caller)
    try:
        save([layer], diff, f"{base}/kept", quota_bytes=1 << 20, caller=caller)
        error = ""
    except Exception as exc:
        error = str(exc)
    with open(f"{base}/out.pkl", "wb") as f:
        pickle.dump({"changes": diff.changes, "error": error}, f)
    """
)


def test_below_a_directory_the_caller_cannot_search(public_tmp: Path) -> None:
    tmp_path = public_tmp  # every directory above the layer may be searched by the caller
    secret = new_secret()
    host, scratch = tmp_path / "host", tmp_path / "scratch"
    vault = host / "vault"
    (vault / "sub").mkdir(parents=True)  # 0755: only the directory above it is private
    scratch.mkdir()
    write(vault / "sub" / "old.txt", secret, 0o644, OTHER_USER, OTHER_USER)
    os.chown(vault, OTHER_USER, OTHER_USER)
    os.chmod(vault, 0o700)
    os.chmod(tmp_path, 0o755)
    before = mount_table()
    unshare = ["unshare", "--mount", "--propagation", "private"]
    subprocess.run(
        [*unshare, sys.executable, "-c", _PLANTED, str(tmp_path), secret.decode()], check=True
    )
    assert mount_table() == before
    import pickle

    out = pickle.loads((tmp_path / "out.pkl").read_bytes())
    changes = {c.path: c for c in out["changes"]}
    for name in (b"new.txt", b"old.txt"):
        change = changes[os.fsencode(vault) + b"/sub/" + name]
        assert change.unreadable, change
        assert change.unified_diff == "" and change.sha256_after == ""
        assert secret.strip().decode() not in repr(change)
    assert "CHANGES_UNREADABLE" in out["error"]
    assert not (tmp_path / "kept").exists()


@pytest.fixture(autouse=True)
def _no_mounts_left() -> Iterator[None]:
    before = mount_table()
    yield
    assert mount_table() == before


# What the caller may read is reported exactly as root would report it (the diff alone). Many
# files between subdirectories, so that opening them in batches is exercised too.
_SAME = textwrap.dedent(
    """
    import os, pickle, subprocess, sys
    from airlock.sandbox.diff import Caller, DiffOptions, Layer, compute_changes
    from airlock.sandbox.changeset import save

    base = sys.argv[1]
    host, scratch = f"{base}/host", f"{base}/scratch"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=755", "tmpfs", scratch],
                   check=True)
    upper, work, merged = (f"{scratch}/{d}" for d in ("u", "w", "m"))
    for d in (upper, work, merged):
        os.mkdir(d)
    os.chown(upper, 65534, 65534)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={host},upperdir={upper},workdir={work},"
                    "redirect_dir=off,index=off,metacopy=off,xino=off", merged], check=True)
    script = '''
        for i in $(seq 100 299); do echo "file $i" > f$i; done
        for d in f150d f200d f250d; do mkdir $d; echo in > $d/x; done
        head -c 3000 /dev/urandom > f160; head -c 100000 /dev/zero > f170
        printf 'same size\\n' > same.txt; echo more >> grown.txt; rm gone.txt; chmod 600 mode.txt
        mkdir -p deep/a/b/c && echo deep > deep/a/b/c/leaf
    '''
    subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                    "bash", "-ec", script], cwd=merged, check=True)
    layer = Layer(host.encode(), upper.encode(), host.encode())
    options = DiffOptions(workspace=host.encode(), exclude=(f"{host}/f120".encode(),))
    out = {}
    for who, caller in (("root", None), ("caller", Caller(65534, 65534, (4242,)))):
        diff = compute_changes([layer], options, caller)
        manifest = save([layer], diff, f"{base}/kept-{who}", quota_bytes=1 << 24, caller=caller)
        with open(f"{base}/kept-{who}/content", "rb") as f:
            out[who] = (diff, manifest.changes, f.read())
    with open(f"{base}/out.pkl", "wb") as f:
        pickle.dump(out, f)
    """
)


def test_what_the_caller_may_read_is_reported_as_root_reports_it(public_tmp: Path) -> None:
    tmp_path = public_tmp  # every directory above the layer may be searched by the caller
    host = tmp_path / "host"
    host.mkdir()
    for name, data in (("same.txt", "old size\n"), ("grown.txt", "g\n"), ("gone.txt", "x\n")):
        write(host / name, data.encode(), 0o644, NOBODY, NOBODY)
    write(host / "mode.txt", b"m\n", 0o644, NOBODY, NOBODY)
    os.chown(host, NOBODY, NOBODY)
    (tmp_path / "scratch").mkdir()
    os.chmod(tmp_path, 0o755)
    unshare = ["unshare", "--mount", "--propagation", "private"]
    subprocess.run([*unshare, sys.executable, "-c", _SAME, str(tmp_path)], check=True)
    import pickle

    out = pickle.loads((tmp_path / "out.pkl").read_bytes())
    (root_diff, root_records, root_content) = out["root"]
    (caller_diff, caller_records, caller_content) = out["caller"]
    assert len(root_diff.changes) > 200
    assert not any(c.unreadable for c in caller_diff.changes)
    assert caller_diff == root_diff
    assert caller_records == root_records and caller_content == root_content
