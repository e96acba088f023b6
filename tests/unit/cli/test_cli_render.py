"""The CLI's report rendering, and the client and CLI against a stand-in gRPC server."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from rich.console import Console, RenderableType

from airlock import types as T
from airlock._environ import caller_environment
from airlock._errors import AirlockError, InvalidRequest, Unavailable
from airlock.api.convert import capabilities_to_proto, validation_to_proto
from airlock.api.status import to_rpc_status
from airlock.audit import Anchor, ProblemKind, StoredEvent, VerifyProblem, VerifyResult
from airlock.cli import render as R
from airlock.cli.main import main
from airlock.cli.workflow import offer_apply
from airlock.client import Client, default_socket_path
from airlock.v1 import sandbox_pb2 as pb
from airlock.v1 import sandbox_pb2_grpc as pb_grpc
from tests.helpers.audit import event as audit_event


def render(renderable: RenderableType) -> str:
    out = io.StringIO()
    Console(file=out, width=100, color_system=None).print(renderable)
    return out.getvalue()


def render_colour(renderable: RenderableType) -> str:
    out = io.StringIO()
    Console(file=out, width=100, color_system="standard", force_terminal=True).print(renderable)
    return out.getvalue()


def change(path: bytes, kind: T.ChangeKind, **kw: Any) -> T.FileChange:
    kw.setdefault("file_type", T.FileType.REGULAR)
    kw.setdefault("in_workspace", True)
    return T.FileChange(path=path, kind=kind, **kw)


CHANGES = (
    change(b"/w/new.txt", T.ChangeKind.CREATED, size_after=12, mode_after=0o100644),
    change(
        b"/w/README",
        T.ChangeKind.MODIFIED,
        previous_file_type=T.FileType.REGULAR,
        size_before=100,
        size_after=2048,
        unified_diff="--- a/README\n+++ b/README\n@@ -1 +1 @@\n-old line\n+new line\n",
    ),
    change(
        b"/etc/hosts",
        T.ChangeKind.DELETED,
        previous_file_type=T.FileType.REGULAR,
        size_before=220,
        in_workspace=False,
    ),
    change(
        b"/w/build",
        T.ChangeKind.DELETED,
        file_type=T.FileType.DIRECTORY,
        previous_file_type=T.FileType.DIRECTORY,
        entries_deleted=42,
    ),
    change(
        b"/w/sub/link",
        T.ChangeKind.CREATED,
        file_type=T.FileType.SYMLINK,
        symlink_target=b"../target",
    ),
    change(
        b"/w/run.sh",
        T.ChangeKind.METADATA_CHANGED,
        previous_file_type=T.FileType.REGULAR,
        mode_before=0o100644,
        mode_after=0o100755,
    ),
)

VALIDATION = T.Validation(
    validation_id="val-1",
    verdict=T.Verdict.DENY,
    summary="deleted 1 file outside the workspace",
    findings=(
        T.Finding(
            "fs.outside-workspace",
            T.Verdict.DENY,
            T.Severity.HIGH,
            "deletes a file outside the workspace",
            T.FindingSource.DYNAMIC,
            subcommand="rm /etc/hosts",
            span=(0, 13),
        ),
    ),
    termination=T.Termination.EXITED,
    exit_code=0,
    stdout=b"hello\n",
    stderr=b"warn: \xff\n",
    stderr_truncated=True,
    changes=CHANGES,
    timings=T.Timings(total_s=0.0153, sandbox_s=0.012, command_s=0.0081),
    resource_usage=T.ResourceUsage(peak_memory_bytes=3 * 1024 * 1024),
    uid=1000,
    gid=1000,
)


# --- rendering ----------------------------------------------------------------------


def test_report_has_verdict_summary_findings_and_run() -> None:
    text = render(R.render_validation(VALIDATION))
    first = text.splitlines()[0]
    assert first.startswith("Verdict: DENY") and "deleted 1 file outside the workspace" in first
    assert "fs.outside-workspace" in text and "in: rm /etc/hosts" in text
    assert "Process: exited with code 0" in text
    assert "total 15.3 ms" in text and "command 8.1 ms" in text
    assert "peak memory 3 MiB" in text
    assert "hello" in text


@pytest.mark.parametrize(
    ("verdict", "colour"),
    [(T.Verdict.ALLOW, "green"), (T.Verdict.ASK, "yellow"), (T.Verdict.DENY, "red")],
)
def test_verdict_is_coloured(verdict: T.Verdict, colour: str) -> None:
    assert colour in R.verdict_style(verdict)
    codes = {"green": "32", "yellow": "33", "red": "31"}
    assert f"\x1b[1;{codes[colour]}m{verdict.name}" in render_colour(R.verdict_text(verdict))


def test_tree_groups_by_directory_with_kind_markers() -> None:
    lines = render(R.change_tree(CHANGES)).splitlines()
    assert lines[0] == "Changes: 6 (1 outside the workspace)"
    body = "\n".join(lines)
    # Directories sorted; each entry under its parent, with its marker and details.
    assert [ln.strip("│├└─ ") for ln in lines if ln.lstrip("│├└─ ").startswith("/")] == [
        "/etc",
        "/w",
        "/w/sub",
    ]
    assert "+ new.txt  (12 B, mode 0644)" in body
    assert "~ README  (100 B → 2 KiB)" in body
    assert "- build/  (42 entries)" in body
    assert "+ link -> ../target" in body
    assert "m run.sh  (mode 0644 → 0755)" in body
    (outside,) = [ln for ln in lines if "outside workspace" in ln]
    assert "- hosts  (220 B)" in outside
    assert lines.index(outside) == lines.index("├── /etc") + 1


@pytest.mark.parametrize(
    ("kind", "colour"),
    [
        (T.ChangeKind.CREATED, "32"),
        (T.ChangeKind.MODIFIED, "33"),
        (T.ChangeKind.DELETED, "31"),
        (T.ChangeKind.METADATA_CHANGED, "34"),
    ],
)
def test_change_marker_is_coloured_by_kind(kind: T.ChangeKind, colour: str) -> None:
    marker = {"32": "+", "33": "~", "31": "-", "34": "m"}[colour]
    assert f"\x1b[1;{colour}m{marker} " in render_colour(R.change_label(change(b"/w/f", kind)))


def test_outside_workspace_mark_only_on_entries_outside() -> None:
    inside = render(R.change_label(change(b"/w/a", T.ChangeKind.CREATED)))
    outside = render(R.change_label(change(b"/a", T.ChangeKind.CREATED, in_workspace=False)))
    assert "outside workspace" not in inside
    assert "outside workspace" in outside


def test_truncated_changes_are_noted() -> None:
    assert "more changes were made" in render(R.change_tree(CHANGES[:1], truncated=True))
    assert "more changes were made" not in render(R.change_tree(CHANGES[:1]))


def test_diffs_of_text_files_are_shown() -> None:
    text = render(R.render_validation(VALIDATION))
    assert "diff /w/README" in text
    assert "-old line" in text and "+new line" in text
    truncated = change(b"/w/x", T.ChangeKind.MODIFIED, unified_diff="+x\n", diff_truncated=True)
    assert "diff /w/x  (truncated)" in render(R.diffs([truncated])[1])
    assert R.diffs([change(b"/w/bin", T.ChangeKind.CREATED, binary=True)]) == []


def test_hostile_names_and_output_cannot_style_or_drive_the_terminal() -> None:
    evil = T.Validation(
        validation_id="v",
        verdict=T.Verdict.ASK,
        summary="[red]not markup[/red]",
        stdout=b"\x1b[2J\x1b]0;title\x07ok\r\n",
        changes=(
            change(
                b"/w/[bold]x[/bold]\n\x1b[31m\xff",
                T.ChangeKind.CREATED,
                unified_diff="+\x1b[31mred\n",
            ),
        ),
    )
    text = render(R.render_validation(evil))
    assert "\x1b" not in text and "\x07" not in text
    assert "[red]not markup[/red]" in text
    assert "[bold]x[/bold]\\x0a\\x1b[31m\\xff" in text
    assert "\\x1b[2J\\x1b]0;title\\x07ok" in text
    assert "+\\x1b[31mred" in text


def test_escape_controls() -> None:
    assert R.escape_controls("a\tb\nc\x7f\u202e") == "a\\x09b\\x0ac\\x7f\\u202e"
    assert R.escape_controls("a\tb\r\nc\rd", multiline=True) == "a\tb\nc\\x0dd"
    assert R.display_path(b"/caf\xc3\xa9/\xff") == "/café/\\xff"


@pytest.mark.parametrize(
    ("n", "shown"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (5 * 1024**3, "5 GiB")],
)
def test_human_size(n: int, shown: str) -> None:
    assert R.human_size(n) == shown


def test_a_long_output_is_bounded_in_the_report_and_whole_with_all() -> None:
    """100,000 lines (or one 100 KB line) in the report: its start, and how much more there is
    (it printed every line)."""
    lines = b"".join(b"line %d\n" % i for i in range(100_000))
    bounded = render(R.output_panel("stdout", lines, truncated=False, max_lines=60))
    assert "line 59" in bounded and "line 60" not in bounded
    assert "99940 more line(s)" in bounded and "--all" in bounded
    assert bounded.count("\n") < 70
    one_line = render(R.output_panel("stdout", b"y" * 100_000, truncated=False, max_bytes=1000))
    assert one_line.replace("everything", "").count("y") == 1000 and "not shown" in one_line
    whole = render(R.output_panel("stdout", lines, truncated=False))
    assert "line 99999" in whole and "not shown" not in whole
    assert "not shown" not in render(
        R.output_panel("stdout", b"a\nb\n", truncated=False, max_lines=2)
    )


@pytest.mark.parametrize(
    ("why", "advice"),
    [
        (
            "2502 changes are more than the 2000 a dry run keeps for Apply; run the command with "
            "Execute instead",
            "run the command with Execute (`airlock run`) or in smaller steps",
        ),
        (
            "the quota is full of other validations' changes [CHANGESET_QUOTA_EXCEEDED]",
            "apply or discard pending validations",
        ),
    ],
)
def test_changes_not_kept_say_what_would_keep_them(why: str, advice: str) -> None:
    v = T.Validation(
        validation_id="v1",
        verdict=T.Verdict.ASK,
        summary="s",
        changes=(
            T.FileChange(path=b"/w/f", kind=T.ChangeKind.CREATED, file_type=T.FileType.REGULAR),
        ),
        changes_not_kept=why,
    )
    text = " ".join(render(R.render_validation(v)).split())
    assert "Not kept for apply:" in text and advice in text, text
    if "pending" not in advice:
        assert "validate again" not in text.replace("validating again would not", ""), text


def test_output_is_decoded_with_replacement_and_truncation_noted() -> None:
    text = render(R.output_panel("stderr", b"warn: \xff\n", truncated=True))
    assert "stderr (8 B, truncated)" in text
    assert "warn: \ufffd" in text
    assert "truncated" not in render(R.output_panel("stdout", b"x", truncated=False))


@pytest.mark.parametrize(
    ("v", "expected"),
    [
        (T.Validation("v", T.Verdict.DENY, "", exit_code=3), "exited with code 3"),
        (
            T.Validation("v", T.Verdict.DENY, "", termination=T.Termination.SIGNALED, signal=9),
            "killed by signal 9 (SIGKILL)",
        ),
        (T.Validation("v", T.Verdict.DENY, "", termination=T.Termination.TIMED_OUT), "timed out"),
        (
            T.Validation("v", T.Verdict.DENY, "", termination=T.Termination.OUT_OF_MEMORY),
            "out of memory",
        ),
        (T.Validation("v", T.Verdict.DENY, "", termination=T.Termination.CANCELLED), "cancelled"),
        (T.Validation("v", T.Verdict.DENY, "", sandboxed=False), "without a dry run"),
    ],
)
def test_termination(v: T.Validation, expected: str) -> None:
    assert expected in render(R.termination_text(v))


def test_unsandboxed_report_has_no_run_details() -> None:
    text = render(
        R.render_validation(T.Validation("v", T.Verdict.DENY, "fork bomb", sandboxed=False))
    )
    assert "Verdict: DENY  fork bomb" in text
    assert "Resources" not in text and "stdout" not in text and "Changes" not in text


CAPABILITIES = T.Capabilities(
    daemon_version="9.9.9",
    kernel_release="6.1.0-test",
    namespaces=("mnt", "pid", "net"),
    overlayfs=True,
    cgroup_version=T.CgroupVersion.V1,
    cgroup_controllers=("memory", "pids"),
    seccomp=False,
    seccomp_user_notification=False,
    limits=T.Limits(default_timeout_s=30.0, max_timeout_s=300.0),
)


def test_capabilities_table() -> None:
    text = render(R.render_capabilities(CAPABILITIES))
    assert "9.9.9" in text and "6.1.0-test" in text
    assert "mnt, pid, net" in text
    assert "v1: memory, pids" in text
    assert "30 s (max 300 s)" in text
    no_cgroups = render(
        R.render_capabilities(
            T.Capabilities("1", "k", (), False, T.CgroupVersion.NONE, (), False, False, T.Limits())
        )
    )
    assert "not enforced" in no_cgroups


# --- client and CLI against a stand-in server ---------------------------------------


@dataclass
class _Servicer(pb_grpc.SandboxServiceServicer):
    """Answers with canned results and records what it was asked."""

    validation: T.Validation = VALIDATION
    error: AirlockError | None = None
    requests: list[pb.ValidateRequest] = field(default_factory=list)
    capabilities: T.Capabilities = CAPABILITIES
    calls: list[str] = field(default_factory=list)

    def Validate(self, request: pb.ValidateRequest, context: Any) -> pb.ValidateResponse:
        self.requests.append(request)
        if self.error is not None:
            context.abort_with_status(to_rpc_status(self.error))
        return validation_to_proto(self.validation)

    def GetCapabilities(
        self, request: pb.GetCapabilitiesRequest, context: Any
    ) -> pb.GetCapabilitiesResponse:
        return capabilities_to_proto(self.capabilities)

    def Approve(self, request: pb.ApproveRequest, context: Any) -> pb.ApproveResponse:
        self.calls.append(f"approve {request.validation_id}")
        return pb.ApproveResponse(approval_token="t", approval_id="a", approver_uid=0)

    def Apply(self, request: pb.ApplyRequest, context: Any) -> pb.ApplyResponse:
        self.calls.append(f"apply {request.validation_id}")
        return pb.ApplyResponse(validation_id=request.validation_id, applied_paths=["/w/f"])


@dataclass
class Daemon:
    socket: str
    servicer: _Servicer
    health: Any


@pytest.fixture
def daemon(tmp_path: Any) -> Iterator[Daemon]:
    servicer = _Servicer()
    health_servicer = health.HealthServicer()
    health_servicer.set("airlock.v1.SandboxService", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_SandboxServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    socket = os.path.join(tmp_path, "airlock.sock")
    server.add_insecure_port("unix:" + socket)
    server.start()
    try:
        yield Daemon(socket, servicer, health_servicer)
    finally:
        server.stop(None).wait()


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRLOCK_SOCKET", raising=False)
    assert default_socket_path() == "/run/airlock/airlock.sock"
    monkeypatch.setenv("AIRLOCK_SOCKET", "/tmp/elsewhere.sock")
    assert default_socket_path() == "/tmp/elsewhere.sock"
    assert Client().socket_path == "/tmp/elsewhere.sock"


def test_client_validate_returns_types_and_sends_defaults(
    daemon: Daemon, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AIRLOCK_TEST_MARK", "present")
    with Client(daemon.socket) as client:
        assert client.validate("rm /etc/hosts") == VALIDATION
        client.validate("true", cwd="sub", env={"B": "2", "A": "1"}, timeout=2.5, uid=0)
        client.validate_raw("true", env={})
        client.validate_raw("true")
    first, second, empty, raw = daemon.servicer.requests
    # The default env is this process's, as the CLI sends it (docs/decisions.md section 33).
    assert (first.command, first.cwd) == ("rm /etc/hosts", str(tmp_path))
    assert dict(first.env) == dict(raw.env) == caller_environment()
    assert first.env["AIRLOCK_TEST_MARK"] == "present"
    assert dict(empty.env) == {}
    assert not first.HasField("timeout") and not first.HasField("uid")
    assert second.cwd == os.path.join(tmp_path, "sub")
    assert dict(second.env) == {"A": "1", "B": "2"}
    assert (second.timeout.seconds, second.timeout.nanos) == (2, 500_000_000)
    assert second.HasField("uid") and second.uid == 0 and not second.HasField("gid")


def test_client_capabilities_and_health(daemon: Daemon) -> None:
    with Client(daemon.socket, timeout=10) as client:
        assert client.capabilities() == CAPABILITIES
        assert client.health() is True
        daemon.health.set("airlock.v1.SandboxService", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert client.health() is False


ASKED = T.Validation("v1", T.Verdict.ASK, "asks", uid=os.getuid(), changes_digest="d" * 64)


def _offer(daemon: Daemon, v: T.Validation, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """offer_apply's output lines, and each question it asked (answered yes) as "? ..."."""
    asked: list[str] = []

    def answer(question: str) -> str:
        asked.append(f"? {question.strip()}")
        return "y"

    monkeypatch.setattr("builtins.input", answer)
    out = io.StringIO()
    with Client(daemon.socket, timeout=10) as client:
        offer_apply(client, v, Console(file=out, width=300, color_system=None))
    return asked + out.getvalue().splitlines()


def test_no_approval_is_offered_for_an_own_ask_the_daemon_would_refuse(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # allow-self-approval off: "y" would only earn SELF_APPROVAL_NOT_ALLOWED.
    assert _offer(daemon, ASKED, monkeypatch) == [
        "Not applied: an approver must approve it as another user (airlock approve v1); "
        "then: airlock apply v1"
    ]
    assert daemon.servicer.calls == []


def test_approval_is_offered_when_the_daemon_allows_it(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon.servicer.capabilities = dataclasses.replace(CAPABILITIES, allow_self_approval=True)
    assert _offer(daemon, ASKED, monkeypatch) == [
        "? Approve and apply these changes? [y/N]",
        "Applied 1 path(s).",
    ]
    assert daemon.servicer.calls == ["approve v1", "apply v1"]
    # Another uid's validation: this caller may be one of the daemon's approvers.
    daemon.servicer.capabilities, daemon.servicer.calls = CAPABILITIES, []
    other = dataclasses.replace(ASKED, uid=os.getuid() + 1)
    assert _offer(daemon, other, monkeypatch)[0] == "? Approve and apply these changes? [y/N]"
    assert daemon.servicer.calls == ["approve v1", "apply v1"]
    # An ALLOW needs no approval: the question is the same whatever the daemon allows.
    allowed = dataclasses.replace(ASKED, verdict=T.Verdict.ALLOW)
    assert _offer(daemon, allowed, monkeypatch)[0] == "? Apply these changes? [y/N]"


def test_closed_client_raises_an_airlock_error(daemon: Daemon) -> None:
    client = Client(daemon.socket)
    client.close()
    with pytest.raises(Unavailable) as info:
        client.health()
    assert info.value.reason == "CLIENT_CLOSED"


@pytest.mark.parametrize(
    ("verdict", "status"), [(T.Verdict.ALLOW, 0), (T.Verdict.ASK, 3), (T.Verdict.DENY, 4)]
)
def test_cli_validate_exit_status_is_the_verdict(
    daemon: Daemon, capsys: pytest.CaptureFixture[str], verdict: T.Verdict, status: int
) -> None:
    daemon.servicer.validation = T.Validation("v", verdict, "the summary")
    assert main(["validate", "--socket", daemon.socket, "--", "ls", "-la", "/"]) == status
    out = capsys.readouterr().out
    assert f"Verdict: {verdict.name}  the summary" in out
    assert daemon.servicer.requests[0].command == "ls -la /"


def test_cli_validate_passes_options_and_environment(
    daemon: Daemon, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRLOCK_SOCKET", daemon.socket)
    monkeypatch.setenv("AIRLOCK_TEST_MARK", "present")
    assert main(["validate", "--cwd", str(tmp_path), "--timeout", "1.5", "--", "echo hi"]) == 4
    assert main(["validate", "--clean-env", "--", "env"]) == 4
    with_env, clean = daemon.servicer.requests
    assert with_env.command == "echo hi" and with_env.cwd == str(tmp_path)
    assert with_env.env["AIRLOCK_TEST_MARK"] == "present"
    assert with_env.timeout.seconds == 1 and with_env.timeout.nanos == 500_000_000
    assert dict(clean.env) == {}


def test_cli_validate_json_is_the_canonical_mapping(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", "--socket", daemon.socket, "--json", "--", "true"]) == 4
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "VERDICT_DENY"
    assert doc["validationId"] == "val-1"
    assert doc["changes"][2]["path"] == "/etc/hosts"
    assert doc["timings"]["total"] == "0.015300s"


def test_cli_validate_quiet_prints_only_the_id(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", "--socket", daemon.socket, "-q", "--", "true"]) == 4
    assert capsys.readouterr().out == "val-1\n"
    assert main(["validate", "--socket", daemon.socket, "-q", "--json", "--", "true"]) == 2


def test_cli_capabilities_and_health(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capabilities", "--socket", daemon.socket]) == 0
    assert "9.9.9" in capsys.readouterr().out
    assert main(["capabilities", "--socket", daemon.socket, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cgroupVersion"] == "CGROUP_VERSION_V1"
    assert main(["health", "--socket", daemon.socket]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    daemon.health.set("airlock.v1.SandboxService", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["health", "--socket", daemon.socket]) == 1
    assert capsys.readouterr().out.strip() == "NOT_SERVING"


def test_cli_server_error_is_one_line_with_reason(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.servicer.error = InvalidRequest("cwd must be absolute", reason="INVALID_CWD")
    assert main(["validate", "--socket", daemon.socket, "--", "true"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "airlock: error: cwd must be absolute [INVALID_CWD]\n"


def test_cli_unreachable_daemon(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    socket = os.path.join(tmp_path, "none.sock")
    assert main(["health", "--socket", socket]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"airlock: error: cannot reach the Airlock daemon at {socket}")
    assert err.endswith("[UNAVAILABLE]\n")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["validate"],
        ["validate", "--"],
        ["validate", "--timeout", "nan", "--", "true"],
        ["validate", "--timeout", "soon", "--", "true"],
        ["health", "extra"],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_cli_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "validate" in capsys.readouterr().out


# --- audit list and verify ----------------------------------------------------------


def test_rendering_is_compact_and_escapes_controls() -> None:
    from rich.console import Console

    from airlock.cli import render as _render

    def text(renderable: object) -> str:
        out = io.StringIO()
        Console(file=out, width=160, color_system=None).print(renderable)
        return out.getvalue()

    hostile = audit_event(3, command="echo \x1b[2J; rm -rf ~" + "x" * 200, verdict=None)
    shown = text(
        _render.render_audit_events(
            [
                StoredEvent(9, "0" * 64, "1" * 64, hostile),
                *[StoredEvent(i, "0" * 64, "1" * 64, audit_event(i)) for i in range(1, 3)],
            ]
        )
    )
    assert "\x1b" not in shown and "echo \\x1b[2J; rm -rf ~" in shown
    assert "x" * 79 not in shown  # the command is cut
    assert len(shown.splitlines()) == 4  # a header and one line per event
    assert "approve" in shown and " 1000  python3[4003] " in shown
    ok = text(_render.render_audit_verify(VerifyResult(3, Anchor(3, "e" * 64))))
    assert ok.startswith("OK: 3 events, chain intact.") and f"head 3:{'e' * 64}" in ok
    bad = text(
        _render.render_audit_verify(
            VerifyResult(1, Anchor(1, "f" * 64), VerifyProblem(ProblemKind.DELETED, 2, "gone"))
        )
    )
    assert bad.startswith("PROBLEM: DELETED at event 2: gone") and "1 event before it" in bad
