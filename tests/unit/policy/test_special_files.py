"""Special files (setuid, setgid, file capabilities, devices, FIFOs, sockets), without a daemon.

What makes a change special (``airlock._special``), the ``files.special`` key of effect rules
and the shipped rules that use it, Apply's own refusal of special files no approval names (on a
changeset written by hand to ``tmp_path``), the planner's nosuid/nodev on every overlay and bind,
and the state store's per-uid share of the changeset quota and its schema upgrade. The kernel
and daemon side is tests/daemon/test_security_effects.py.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import struct
import textwrap
from pathlib import Path

import pytest

from airlock import FailedPrecondition, InvalidRequest, ResourceExhausted
from airlock._special import Special, change_specials, describe_capabilities, specials
from airlock.core.state import ApprovalScope, NewValidation, StateStore, ValidationRecord
from airlock.policy.effects import synthetic_effects
from airlock.policy.loader import PolicyBundle, PolicyError, load_bundle
from airlock.sandbox import _syscalls as sc
from airlock.sandbox.apply import apply, record_specials
from airlock.sandbox.cgroup import CgroupHost, CgroupSpec
from airlock.sandbox.changeset import (
    CONTENT_NAME,
    MANIFEST_NAME,
    ChangeRecord,
    EntryState,
    Manifest,
    _check,
    load,
)
from airlock.sandbox.plan import (
    Bind,
    Overlay,
    SandboxSettings,
    Tmpfs,
    build_template,
    parse_mountinfo,
)
from airlock.types import (
    CgroupVersion,
    ChangeKind,
    Effects,
    FileChange,
    FileType,
    OtherType,
    Verdict,
)
from tests.helpers import CHECKOUT

DEFAULT_POLICY = CHECKOUT / "airlock" / "policy" / "default"
WS = "/home/me/proj"
C, M, D, META = (
    ChangeKind.CREATED,
    ChangeKind.MODIFIED,
    ChangeKind.DELETED,
    ChangeKind.METADATA_CHANGED,
)
REG, DIR, LNK, OTHER = FileType.REGULAR, FileType.DIRECTORY, FileType.SYMLINK, FileType.OTHER
# struct vfs_cap_data, revision 2: cap_net_raw (13) permitted, and the effective flag.
NET_RAW_EP = struct.pack("<IIIII", 0x02000000 | 1, 1 << 13, 0, 0, 0)


def change(
    name: str,
    kind: ChangeKind = C,
    *,
    file_type: FileType = REG,
    mode: int | None = 0o644,
    before: int | None = None,
    other: OtherType = OtherType.NONE,
    caps: str = "",
) -> FileChange:
    return FileChange(
        path=f"{WS}/{name}".encode(),
        kind=kind,
        file_type=file_type,
        in_workspace=True,
        mode_before=before,
        mode_after=None if kind is D else mode,
        other_type=other,
        capabilities=caps,
    )


# --- What is special ----------------------------------------------------------------------------

CASES = [
    # (change, how it is special)
    (change("sh", mode=0o4755), {"setuid"}),
    (change("sh", mode=0o6755), {"setuid", "setgid"}),
    (change("tool", META, mode=0o4755, before=0o755), {"setuid"}),  # chmod u+s
    (change("tool", META, mode=0o2755, before=0o755), {"setgid"}),  # chmod g+s
    (change("tool", META, mode=0o4750, before=0o4755), set()),  # keeps a bit it had
    (change("tool", META, mode=0o6755, before=0o4755), {"setgid"}),  # adds one of two
    (change("passwd", M, mode=0o4755, before=0o4755), {"setuid"}),  # new content, setuid
    (change("shared", C, file_type=DIR, mode=0o2775), set()),  # a setgid directory
    (change("shared", META, file_type=DIR, mode=0o2775, before=0o775), set()),
    (change("odd", META, file_type=DIR, mode=0o4755, before=0o755), set()),  # means nothing
    (change("link", file_type=LNK, mode=0o777), set()),
    (change("sh", D, before=0o4755), set()),  # deletions never are
    (change("ping", caps="cap_net_raw=ep"), {"capabilities"}),
    (change("ping", M, caps="cap_net_raw=ep", before=0o755), {"capabilities"}),
    (change("ping", META, mode=0o700, before=0o755, caps="cap_net_raw=ep"), set()),  # had them
    (change("pipe", file_type=OTHER, other=OtherType.FIFO), {"fifo"}),
    (change("sock", file_type=OTHER, other=OtherType.SOCKET), {"socket"}),
    (change("null", file_type=OTHER, other=OtherType.CHAR_DEVICE), {"device"}),
    (change("sda", META, file_type=OTHER, other=OtherType.BLOCK_DEVICE, before=0o600), {"device"}),
    (change("what", file_type=OTHER), {"device"}),  # an OTHER of unknown kind: fail closed
    (change("pipe", D, file_type=OTHER, other=OtherType.FIFO), set()),
    (change("plain.txt"), set()),
]


@pytest.mark.parametrize(("c", "expected"), CASES, ids=lambda x: getattr(x, "path", b"").decode())
def test_what_is_special(c: FileChange, expected: set[str]) -> None:
    assert {s.value for s in change_specials(c)} == expected


def test_a_manifest_record_is_special_the_same_way() -> None:
    def rec(kind: ChangeKind, before: EntryState, after: EntryState) -> ChangeRecord:
        return ChangeRecord(b"/x", kind, before, after)

    absent = EntryState(FileType.NONE)
    assert record_specials(rec(C, absent, EntryState(REG, mode=0o4755))) == {Special.SETUID}
    assert record_specials(
        rec(META, EntryState(REG, mode=0o755), EntryState(REG, mode=0o2755))
    ) == {Special.SETGID}
    assert not record_specials(
        rec(META, EntryState(REG, mode=0o4755), EntryState(REG, mode=0o4700))
    )
    fifo = EntryState(OTHER, mode=0o644, fmt=stat.S_IFIFO)
    assert record_specials(rec(C, absent, fifo)) == {Special.FIFO}
    caps = EntryState(REG, mode=0o755, sha256="0" * 64, offset=0, caps=NET_RAW_EP)
    assert record_specials(rec(C, absent, caps)) == {Special.CAPABILITIES}
    assert specials(
        kind=C, file_type=DIR, other=OtherType.NONE, mode_before=None, mode_after=0o2775,
        capabilities=False,
    ) == frozenset()  # fmt: skip


def test_capabilities_are_described_as_getcap_does() -> None:
    assert describe_capabilities(NET_RAW_EP) == "cap_net_raw=ep"
    # Not effective, two with the same flags, one inheritable, a high one (word two).
    raw = struct.pack("<IIIII", 0x02000000, (1 << 10) | (1 << 12), 1 << 21, 1 << (38 - 32), 0)
    assert describe_capabilities(raw) == "cap_net_bind_service,cap_net_admin,cap_perfmon=p " + (
        "cap_sys_admin=i"
    )
    v3 = struct.pack("<IIIIII", 0x03000000 | 1, 1 << 7, 0, 0, 0, 100000)
    assert describe_capabilities(v3) == "cap_setuid=ep [rootid=100000]"
    v1 = struct.pack("<III", 0x01000000, 1, 0)
    assert describe_capabilities(v1) == "cap_chown=p"
    # Anything else is still reported (never "" : an unknown format is not "none").
    assert describe_capabilities(b"\x01") == "unrecognised file capabilities (1 bytes)"
    assert describe_capabilities(NET_RAW_EP + b"x").startswith("unrecognised")


# --- The policy ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default() -> PolicyBundle:
    return load_bundle(DEFAULT_POLICY)


def judged(bundle: PolicyBundle, *changes: FileChange) -> dict[str, Verdict]:
    e = Effects(workspace=WS, home="/home/me", changes=changes)
    return {f.rule_id: f.verdict for f in bundle.judge_effects(e)}


def test_the_shipped_policy_denies_special_files_anywhere(default: PolicyBundle) -> None:
    for c, expected in CASES:
        found = judged(default, c)
        if expected & {"setuid", "setgid", "capabilities"}:
            assert found.get("effect.privileged-file") is Verdict.DENY, c
        else:
            assert "effect.privileged-file" not in found, c
        if expected & {"device"}:  # FIFOs and sockets are reported, not judged
            assert found.get("effect.special-file") is Verdict.DENY, c
        else:
            assert "effect.special-file" not in found, c
    # In the workspace, a setuid shell is the only thing the shipped policy objects to.
    e = Effects(workspace=WS, home="/home/me", changes=(change("sh", mode=0o4755),))
    (finding,) = default.judge_effects(e)
    assert finding.message == (
        f"Makes a setuid, setgid or capability-carrying file: {WS}/sh (created, setuid)"
    )
    e = Effects(workspace=WS, home="/home/me", changes=(change("p", caps="cap_net_raw=ep"),))
    assert default.judge_effects(e)[0].message.endswith("(created, capabilities cap_net_raw=ep)")


def write_policy(tmp_path: Path, text: str) -> Path:
    (tmp_path / "p.yaml").write_text(textwrap.dedent(text))
    return tmp_path


RULE = """\
version: 1
rules:
  - id: t.special
    title: Special
    description: For the tests.
    decision: ask
    severity: high
    effect: {effect}
    tests: {tests}
"""


def test_the_special_key_combines_with_the_others(tmp_path: Path) -> None:
    effect = "{files: {special: [fifo], scope: [system]}}"
    tests = (
        "{match: [{files: [{path: /srv/p, kind: created, type: fifo}]}], "
        "not_match: [{files: [{path: p, kind: created, type: fifo}]}, "
        "{files: [{path: /srv/s, kind: created, type: socket}]}]}"
    )
    bundle = load_bundle(write_policy(tmp_path, RULE.format(effect=effect, tests=tests)))
    assert [r.id for r in bundle.effect_rules] == ["t.special"]


@pytest.mark.parametrize(
    ("effect", "tests", "message", "hint"),
    [
        ("{files: {special: [suid]}}", "{}", "'suid' is not one of setuid", "setuid"),
        (
            "{files: {special: [setuid]}}",
            "{match: [{files: [{path: x, mode: 4755}]}]}",
            "expected a string, found the number 4755",
            "quote it",
        ),
        (
            "{files: {special: [setuid]}}",
            "{match: [{files: [{path: x, mode: '47555'}]}]}",
            "invalid mode '47555'",
            '"4755"',
        ),
        (
            "{files: {special: [setuid]}}",
            "{match: [{files: [{path: x, mode: '0644'}]}]}",
            "should fire",
            "",
        ),
    ],
)
def test_policy_errors_about_special_files(
    tmp_path: Path, effect: str, tests: str, message: str, hint: str
) -> None:
    with pytest.raises(PolicyError) as info:
        load_bundle(write_policy(tmp_path, RULE.format(effect=effect, tests=tests)))
    (problem,) = info.value.problems
    assert message in problem.message and hint in problem.hint, problem


def test_inline_test_entries_describe_special_files() -> None:
    raw = {
        "files": [
            {"path": "sh", "kind": "created", "mode": "4755"},
            {"path": "/srv/t", "kind": "metadata", "mode": "2755", "mode_before": "755"},
            {"path": "p", "kind": "created", "type": "fifo"},
            {"path": "ping", "capabilities": "cap_net_raw=ep"},
        ]
    }
    e = synthetic_effects(raw, (), lambda *a: pytest.fail(f"reported {a}"))
    sh, srv, pipe, ping = e.changes
    assert (sh.mode_after, sh.kind, sh.in_workspace) == (0o4755, C, True)
    assert (srv.mode_before, srv.mode_after, srv.previous_file_type) == (0o755, 0o2755, REG)
    assert (pipe.file_type, pipe.other_type) == (OTHER, OtherType.FIFO)
    assert ping.capabilities == "cap_net_raw=ep" and ping.kind is M
    assert [sorted(change_specials(c)) for c in e.changes] == [
        [Special.SETUID],
        [Special.SETGID],
        [Special.FIFO],
        [Special.CAPABILITIES],
    ]


# --- Apply refuses what no approval names -------------------------------------------------------


def changeset(tmp_path: Path, records: list[ChangeRecord], content: bytes = b"") -> str:
    dest = tmp_path / "changeset"
    dest.mkdir(mode=0o700, parents=True)
    (dest / CONTENT_NAME).write_bytes(content)
    manifest = Manifest(tuple(records), len(content), 1)
    (dest / MANIFEST_NAME).write_bytes(manifest.to_json())
    load(str(dest))  # the rules a saved manifest obeys
    return str(dest)


def new_file(path: Path, content: bytes, mode: int, caps: bytes = b"") -> ChangeRecord:
    after = EntryState(
        REG,
        mode=mode,
        uid=os.geteuid(),
        gid=os.getegid(),
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        offset=0,
        caps=caps,
    )
    return ChangeRecord(os.fsencode(path), C, EntryState(FileType.NONE), after)


def chmod(path: Path, mode: int) -> ChangeRecord:
    st = os.lstat(path)
    before = EntryState(
        REG,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size,
        ino=st.st_ino,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
    )
    after = EntryState(REG, mode=mode, uid=st.st_uid, gid=st.st_gid, size=st.st_size)
    return ChangeRecord(os.fsencode(path), META, before, after)


def test_apply_refuses_a_setuid_file_no_approval_names(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(host / "tool", 0o755)
    records = [new_file(host / "sh", b"\x7fELF", 0o4755), chmod(host / "tool", 0o4755)]
    dest = changeset(tmp_path, records, b"\x7fELF")
    with pytest.raises(FailedPrecondition) as info:
        apply(dest)
    assert info.value.reason == "APPLY_SPECIAL_FILES"
    assert f"{host}/sh would be setuid" in info.value.message
    assert f"{host}/tool would be setuid" in info.value.message
    assert sorted(os.listdir(host)) == ["tool"]  # nothing written, not even a temporary
    assert stat.S_IMODE(os.stat(host / "tool").st_mode) == 0o755
    # One of two named is not enough: still all or nothing.
    with pytest.raises(FailedPrecondition):
        apply(dest, approved=[os.fsencode(host / "sh")])
    assert sorted(os.listdir(host)) == ["tool"]
    result = apply(dest, approved=[os.fsencode(host / "sh"), os.fsencode(host / "tool")])
    assert result.complete
    assert stat.S_IMODE(os.stat(host / "sh").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(host / "tool").st_mode) == 0o4755


def test_apply_refuses_capabilities_no_approval_names_but_writes_fifos(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    absent = EntryState(FileType.NONE)
    me = os.geteuid(), os.getegid()
    fifo = EntryState(OTHER, mode=0o644, uid=me[0], gid=me[1], fmt=stat.S_IFIFO)
    sock = EntryState(OTHER, mode=0o755, uid=me[0], gid=me[1], fmt=stat.S_IFSOCK)
    records = [
        new_file(host / "ping", b"x", 0o755, caps=NET_RAW_EP),
        ChangeRecord(os.fsencode(host / "pipe"), C, absent, fifo),
        ChangeRecord(os.fsencode(host / "sock"), C, absent, sock),
    ]
    dest = changeset(tmp_path, records, b"x")
    with pytest.raises(FailedPrecondition) as info:
        apply(dest)
    message = info.value.message
    assert "ping would be capabilities" in message
    assert "pipe" not in message and "sock" not in message  # inert: not refused
    assert os.listdir(host) == []
    # A manifest never holds a device node (Apply cannot make one): it is not even loaded.
    null = EntryState(OTHER, mode=0o666, fmt=stat.S_IFCHR, rdev=os.makedev(1, 3))
    with pytest.raises(InvalidRequest, match="device node"):
        changeset(tmp_path / "d", [ChangeRecord(os.fsencode(host / "null"), C, absent, null)])


def test_capabilities_round_trip_in_the_manifest() -> None:
    record = new_file(Path("/x/ping"), b"x", 0o755, caps=NET_RAW_EP)
    manifest = Manifest((record,), 1, 1)
    assert f'"caps":"{NET_RAW_EP.hex()}"' in manifest.to_json().decode()
    # Only a state whose content is written may carry them.
    bad = ChangeRecord(
        b"/x/ping", META, EntryState(REG, mode=0o755), EntryState(REG, mode=0o700, caps=b"x")
    )
    with pytest.raises(InvalidRequest, match="file capabilities"):
        _check(Manifest((bad,), 0, 1))


# --- The planner: nosuid and nodev on every overlay and bind -------------------------------------

MOUNTINFO = """\
1 0 8:1 / / rw,relatime - ext4 /dev/sda1 rw
2 1 0:5 / /dev rw,nosuid - devtmpfs udev rw
3 1 8:2 / /data rw,relatime - ext4 /dev/sda2 rw
4 3 0:40 / /data/nodev rw,nosuid,nodev - tmpfs tmpfs rw
5 1 8:1 /etc/hosts /etc/hosts ro - ext4 /dev/sda1 rw
6 1 0:41 / /home/alice/src/cache rw - tmpfs tmpfs rw
"""


def inspect(path: str) -> tuple[int, int, int, int]:
    return (stat.S_IFREG if path == "/etc/hosts" else stat.S_IFDIR), 0o755, 0, 0


@pytest.mark.parametrize("writable", ["", "/home/alice/src"])
def test_every_overlay_and_bind_is_nosuid_nodev(writable: str) -> None:
    template = build_template(
        settings=SandboxSettings(scratch_dir="/var/lib/airlock/scratch", hidden_paths=()),
        scratch_bytes=1 << 20,
        cgroup=CgroupSpec(CgroupHost(CgroupVersion.V2, (), ()), "g", "sb", 1 << 20, 10),
        host_mounts=parse_mountinfo(MOUNTINFO, inspect),
        writable=writable,
    )
    mounts = [op for op in template.host_setup if isinstance(op, Overlay | Bind)]
    assert len(mounts) >= 4, template.host_setup
    for op in mounts:
        assert op.flags & sc.MS_NOSUID and op.flags & sc.MS_NODEV, op
    # The sandbox's own /dev keeps its device nodes usable: nosuid only.
    dev = next(
        op for op in template.host_setup if isinstance(op, Tmpfs) and op.target.endswith("/dev")
    )
    assert dev.flags & sc.MS_NOSUID and not dev.flags & sc.MS_NODEV


# --- The state store: a share of the quota per uid, and the schema upgrade ----------------------


def record(store: StateStore, vid: str, uid: int, size: int) -> None:
    store.record_validation(
        NewValidation(
            validation_id=vid,
            command="make",
            cwd="/w",
            uid=uid,
            gid=uid,
            verdict=Verdict.ALLOW,
            diff_hash="a" * 64,
            changeset_dir=f"/c/{vid}",
            changeset_bytes=size,
        )
    )


def test_approving_an_allowed_validation_names_only_privileged_files(tmp_path: Path) -> None:
    # Apply writes FIFOs and sockets unapproved: the refusal does not suggest naming them.
    with StateStore(tmp_path / "s.db") as store:
        for vid, kinds in (("f1", ("fifo",)), ("s1", ("setuid",))):
            store.record_validation(
                NewValidation(
                    validation_id=vid,
                    command="make",
                    cwd="/w",
                    uid=1000,
                    gid=1000,
                    verdict=Verdict.ALLOW,
                    diff_hash="a" * 64,
                    changeset_dir=f"/c/{vid}",
                    changeset_bytes=10,
                    specials=((b"/w/" + vid.encode(), kinds),),
                )
            )
        with pytest.raises(FailedPrecondition) as fifo:
            store.approve("f1", ApprovalScope.ONCE, approver_uid=0)
        assert fifo.value.message.endswith("is allowed by the policy; it needs no approval")
        with pytest.raises(FailedPrecondition) as setuid:
            store.approve("s1", ApprovalScope.ONCE, approver_uid=0)
        assert setuid.value.message.endswith(
            "it needs no approval; to let Apply write its special files, approve it naming them"
        )


def test_each_uid_has_its_share_of_the_quota(tmp_path: Path) -> None:
    with StateStore(tmp_path / "s.db", quota_bytes=1000, uid_quota_bytes=400) as store:
        record(store, "r1", 0, 400)
        with pytest.raises(ResourceExhausted) as info:
            record(store, "r2", 0, 1)
        assert info.value.reason == "CHANGESET_QUOTA_EXCEEDED"
        assert "uid 0's share of the changeset quota (400 of 400" in info.value.message
        record(store, "u1", 65534, 400)  # another uid is not affected
        record(store, "v1", 1000, 200)
        with pytest.raises(ResourceExhausted) as info:
            record(store, "v2", 1000, 100)  # within its share, but over the total
        assert "the changeset quota (1000 of 1000" in info.value.message
        # Recorded without its changes, it is kept with why, and Apply says so.
        store.record_validation(
            NewValidation(
                validation_id="v3",
                command="make",
                cwd="/w",
                uid=1000,
                gid=1000,
                verdict=Verdict.ALLOW,
                changes_not_kept="over the quota [CHANGESET_QUOTA_EXCEEDED]",
            )
        )
        with pytest.raises(FailedPrecondition) as refused:
            store.begin_apply("v3", uid=1000)
        assert refused.value.reason == "CHANGES_NOT_KEPT"
        assert "CHANGESET_QUOTA_EXCEEDED" in refused.value.message


# The state store's schema version 1, as Airlock wrote it before special files.
SCHEMA_V1 = """
CREATE TABLE validations (
    validation_id TEXT PRIMARY KEY, command TEXT NOT NULL, cwd TEXT NOT NULL,
    env_sha256 TEXT NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    caller_pid INTEGER NOT NULL, session_id TEXT NOT NULL, policy_version TEXT NOT NULL,
    diff_hash TEXT NOT NULL, verdict INTEGER NOT NULL, summary TEXT NOT NULL,
    changeset_dir TEXT NOT NULL, changeset_bytes INTEGER NOT NULL, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, updated_at REAL NOT NULL, state TEXT NOT NULL,
    auth_context TEXT, apply_approval_id TEXT, apply_result_json TEXT, applied_at REAL,
    apply_error TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX validations_state ON validations (state, expires_at);
CREATE TABLE approvals (
    approval_id TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE,
    validation_id TEXT NOT NULL REFERENCES validations (validation_id),
    scope INTEGER NOT NULL, session_id TEXT NOT NULL, uid INTEGER NOT NULL,
    approver_uid INTEGER NOT NULL, approver_subject TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, used_at REAL, ended_at REAL, command TEXT NOT NULL,
    cwd TEXT NOT NULL, policy_version TEXT NOT NULL, diff_hash TEXT NOT NULL
) WITHOUT ROWID;
"""


def test_a_version_1_store_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_V1)
    conn.execute(
        "INSERT INTO validations VALUES ('old', 'make', '/w', '', 7, 7, 1, '', 'p', '', 1, "
        "'s', '/c/old', 10, 1e12, 2e12, 1e12, 'ALLOWED', 'POLICY_ALLOWED', NULL, NULL, NULL, '')"
    )
    conn.execute("PRAGMA application_id = 1095980097")  # 0x41535441, "ASTA"
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with StateStore(path, clock=lambda: 1.5e12) as store:
        old = store.get("old")
        assert (old.changes_not_kept, old.specials, old.changeset_bytes) == ("", (), 10)
        begun = store.begin_apply("old", uid=7)
        assert isinstance(begun, ValidationRecord) and begun.approved_special == ()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()
