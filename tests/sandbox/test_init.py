"""The sandbox's init program (native/airlock-sandbox-init.c, sandbox/init.py) on its own.

Each test starts the real program as pid 1 of a new pid namespace (from a forked child, so the
test process keeps its own), with no mount steps, hands it a run spec and reads its reports:
what it runs, as whom, with which descriptors, and that every malformed input fails closed
(nothing is executed, a report says why).
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass

import pytest

from airlock.sandbox import _syscalls as sc
from airlock.sandbox import init, seccomp
from airlock.sandbox.diff import DiffOptions
from airlock.sandbox.plan import RunSpec
from tests.helpers.fork import in_child


@dataclass(frozen=True)
class Outcome:
    ready: bool
    status: bytes  # init's report after "R": b"S" + wait status, or b"E" + kind NUL text
    stdout: bytes
    stderr: bytes

    @property
    def exit_code(self) -> int:
        assert self.status[:1] == b"S", self.status
        return os.waitstatus_to_exitcode(struct.unpack("=i", self.status[1:5])[0])

    @property
    def failure(self) -> tuple[str, str]:
        assert self.status[:1] == b"E", self.status
        kind, _, text = self.status[1:].partition(b"\0")
        return kind.decode(), text.decode()


def _read_all(fd: int) -> bytes:
    out = bytearray()
    while chunk := os.read(fd, 65536):
        out += chunk
    os.close(fd)
    return bytes(out)


def run_init(
    spec: bytes,
    *,
    argv: list[str] | None = None,
    leak_fd: bool = False,
) -> Outcome:
    """Spawn the program in a new pid namespace, write ``spec``, collect its reports."""

    # Before the pid namespace: libseccomp is looked up with a helper process.
    args = argv if argv is not None else init.arguments((), seccomp.deny_program(), False)

    def child() -> Outcome:
        sc.unshare(sc.CLONE_NEWPID)
        spec_r, spec_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        status_r, status_w = os.pipe()
        if leak_fd:  # an inheritable descriptor the program was not given
            os.set_inheritable(os.open("/etc/hostname", os.O_RDONLY), True)
        pid = init.spawn(args, init.InitFds(spec_r, status_w, out_w, err_w, ()))
        for fd in (spec_r, status_w, out_w, err_w):
            os.close(fd)
        first = os.read(status_r, 1)
        with contextlib.suppress(BrokenPipeError):  # init failed before reading it
            os.write(spec_w, spec)
        os.close(spec_w)
        stdout, stderr = _read_all(out_r), _read_all(err_r)
        status = _read_all(status_r)
        os.waitpid(pid, 0)
        if first != b"R":
            return Outcome(False, first + status, stdout, stderr)
        return Outcome(True, status, stdout, stderr)

    result: Outcome = in_child(child)
    return result


def spec_for(
    script: str,
    *,
    uid: int = 65534,
    gid: int = 65534,
    groups: tuple[int, ...] = (),
    cwd: str = "/",
    env: tuple[tuple[str, str], ...] = (("PATH", "/usr/bin:/bin"),),
    extra: tuple[str, ...] = (),
) -> RunSpec:
    return RunSpec(
        sandbox_id="t",
        argv=("/bin/bash", "-c", script, "bash", *extra),
        env=env,
        cwd=cwd,
        uid=uid,
        gid=gid,
        groups=groups,
        timeout_s=10,
        output_bytes=1 << 20,
        diff=DiffOptions(workspace=b"/"),
    )


def test_the_command_runs_as_the_caller_with_exactly_its_arguments_and_environment() -> None:
    odd = "caf\udce9"  # not UTF-8: the byte 0xe9, as os.fsencode gives it back
    spec = spec_for(
        'id -u; id -g; id -G; printf "%s|" "$@"; echo; printf "%s|" "$A" "$B"; echo; pwd; '
        "echo $$ $PPID",
        uid=65534,
        gid=65533,
        groups=tuple(range(1000, 1200)),
        cwd="/tmp",
        env=(("PATH", "/usr/bin:/bin"), ("A", "x=y z"), ("B", odd)),
        extra=("", "two words", odd),
    )
    out = run_init(init.encode_spec(spec))
    assert out.ready
    assert out.exit_code == 0, out
    lines = out.stdout.split(b"\n")
    assert lines[0] == b"65534"
    assert lines[1] == b"65533"
    assert lines[2].split() == [b"65533", *(str(g).encode() for g in range(1000, 1200))]
    assert lines[3] == b"|two words|caf\xe9|"
    assert lines[4] == b"x=y z|caf\xe9|"
    assert lines[5] == b"/tmp"
    assert lines[6] == b"2 1"  # init's child: pid 2 of the new namespace


def test_the_command_keeps_no_privilege_signal_state_or_stray_descriptor() -> None:
    spec = spec_for(
        "grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp|SigIgn|SigBlk):' "
        "/proc/self/status; ls -l /proc/self/fd | grep -c -- '->'; ls -l /proc/self/fd",
        uid=0,
        gid=0,
    )
    out = run_init(init.encode_spec(spec), leak_fd=True)
    assert out.exit_code == 0, out
    text = out.stdout.decode()
    lines = text.strip().split("\n")
    fields = dict(line.split(":\t") for line in lines if ":\t" in line)
    zero = "0000000000000000"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert fields[cap] == zero, (cap, fields)  # even as uid 0
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"
    glibc_reserved = (1 << 31) | (1 << 32)  # signals 32 and 33
    assert int(fields["SigIgn"], 16) & ~glibc_reserved == 0, fields
    assert int(fields["SigBlk"], 16) == 0, fields
    # ls inherits the command's descriptors and opens one of its own (the directory).
    count = next(line for line in lines if line.isdigit())
    assert count == "4", text
    assert "/etc/hostname" not in text


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda b: b[:10], id="truncated header"),
        pytest.param(lambda b: b[:-1], id="last string unterminated"),
        pytest.param(lambda b: b + b"x\0", id="trailing string"),
        pytest.param(lambda b: b"XXXX" + b[4:], id="wrong magic"),
        pytest.param(lambda b: b[:12] + struct.pack("=I", 1 << 20) + b[16:], id="too many groups"),
        pytest.param(lambda b: b[:16] + struct.pack("=I", 0) + b[20:], id="no argv"),
        pytest.param(lambda b: b[:16] + struct.pack("=I", 99) + b[20:], id="argc past the end"),
        pytest.param(lambda b: b"", id="empty"),
    ],
)
def test_a_malformed_spec_runs_nothing(mangle: object) -> None:
    assert callable(mangle)
    good = init.encode_spec(spec_for("echo ran"))
    out = run_init(mangle(good))
    assert out.ready
    kind, text = out.failure
    assert (kind, text.split(":")[0]) == ("setup", "spec"), out
    assert out.stdout == b""


def test_a_missing_directory_is_the_cwd_kind_and_a_missing_program_is_set_up() -> None:
    out = run_init(init.encode_spec(spec_for("true", cwd="/nonexistent/dir")))
    assert out.failure == ("cwd", "cwd: [Errno 2] No such file or directory: '/nonexistent/dir'")
    spec = spec_for("true")
    spec = RunSpec(**{**spec.__dict__, "argv": ("/nonexistent/bash", "-c", "true")})
    out = run_init(init.encode_spec(spec))
    kind, text = out.failure
    assert kind == "setup" and text.startswith("exec: [Errno 2]"), out


@pytest.mark.parametrize(
    "ids", [{"uid": 0xFFFFFFFF}, {"gid": 0xFFFFFFFF}, {"groups": (0xFFFFFFFF,)}]
)
def test_the_unchanged_id_is_refused(ids: dict[str, object]) -> None:
    """-1 to setresuid/setresgid means "leave it as it is" (root): never a caller's id."""
    out = run_init(init.encode_spec(spec_for("id", **ids)))  # type: ignore[arg-type]
    assert out.failure[0] == "setup" and out.failure[1].startswith("spec: [Errno 22]"), out
    assert out.stdout == b""


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["airlock-sandbox-init", "--seccomp", "zz"], id="not hex"),
        pytest.param(["airlock-sandbox-init", "--seccomp", "00" * 7], id="not whole insns"),
        pytest.param(["airlock-sandbox-init", "--procs", "17"], id="too many procs"),
        pytest.param(["airlock-sandbox-init", "--last-cap"], id="missing value"),
        pytest.param(["airlock-sandbox-init", "--trace"], id="trace without filter"),
        pytest.param(["airlock-sandbox-init", "--bogus", "1"], id="unknown option"),
        pytest.param(["airlock-sandbox-init", "--grace-ms", "60001"], id="grace too long"),
        pytest.param(["airlock-sandbox-init", "--proc", "/nonexistent/proc"], id="mount fails"),
    ],
)
def test_bad_arguments_or_a_failed_step_never_report_ready(argv: list[str]) -> None:
    out = run_init(init.encode_spec(spec_for("echo ran")), argv=argv)
    assert not out.ready
    kind, text = out.failure
    assert kind == "setup" and text.startswith("sandbox init: "), out
    assert out.stdout == b""


def _with_grace(grace_ms: int) -> list[str]:
    return init.arguments((), seccomp.deny_program(), False, grace_ms)


def test_what_the_command_left_running_gets_the_grace_and_is_seen() -> None:
    """A background job that ends within the grace runs to its end (its output is there), and
    the report says nothing was left running."""
    out = run_init(
        init.encode_spec(spec_for("(sleep 0.1; echo late) & echo now")), argv=_with_grace(5000)
    )
    assert out.exit_code == 0 and out.stdout == b"now\nlate\n", out
    assert out.status[5:] == b"\x00", out


def test_what_is_still_running_after_the_grace_is_reported_and_stopped() -> None:
    """A job still running when the grace ends is reported (the last byte) and killed with the
    namespace: its later output never comes, and the run does not wait for it."""
    script = "(sleep 30; echo late) & (sleep 0.05; echo early) & echo now"
    out = run_init(init.encode_spec(spec_for(script)), argv=_with_grace(300))
    assert out.exit_code == 0 and out.stdout == b"now\nearly\n", out
    assert out.status[5:] == b"\x01", out
    # No grace (Execute's init, and the default): anything left is reported at once.
    out = run_init(init.encode_spec(spec_for("sleep 30 & echo now")), argv=_with_grace(0))
    assert out.stdout == b"now\n" and out.status[5:] == b"\x01", out
    out = run_init(init.encode_spec(spec_for("echo alone")), argv=_with_grace(0))
    assert out.stdout == b"alone\n" and out.status[5:] == b"\x00", out


def test_a_nul_byte_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="NUL"):
        init.encode_spec(spec_for("echo \0 hidden"))
    with pytest.raises(ValueError, match="NUL"):
        init.encode_spec(spec_for("true", env=(("A", "b\0c"),)))


def test_a_missing_program_is_named_with_how_to_build_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    monkeypatch.setattr(init, "HELPER", os.path.join(tmp_path, "airlock-sandbox-init"))
    r, w = os.pipe()
    try:
        with pytest.raises(OSError, match=r"airlock-sandbox-init: No such file.*make install"):
            init.spawn(["airlock-sandbox-init"], init.InitFds(r, w, w, w, ()))
    finally:
        os.close(r)
        os.close(w)
