"""``airlock run``, ``apply``, ``discard`` (and, from ``airlock.cli.approvals``,
``pending`` and ``approve``): acting on a verdict.

``run`` is for CI: it streams the command's output live and exits with its exit
code (128 + N for signal N); a command the policy denies exits 126 and one it asks
about exits 125, each after printing why (for an ask, the dry run's summary and the
``airlock approve`` line that would let it through).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console

from airlock import types
from airlock._errors import AirlockError, FailedPrecondition, PermissionDenied
from airlock.cli import _stdin
from airlock.cli import approvals as _approvals
from airlock.cli._env import environment
from airlock.cli._pager import show
from airlock.cli.render import ReportBounds, escape_controls, render_validation
from airlock.client import Client
from airlock.egress import suggestion

__all__ = ["ACTIONS", "EXIT_ASKED", "EXIT_DENIED", "add_parsers", "offer_apply"]

EXIT_DENIED = 126
EXIT_ASKED = 125

Action = Callable[[argparse.Namespace, Console, Console], int]


def add_parsers(sub: Any, socket: argparse.ArgumentParser, seconds: Any) -> None:
    run = sub.add_parser(
        "run",
        parents=[socket],
        help="run a command for real (only --cwd writable), streaming its output",
        usage="airlock run [-h] [--socket PATH] [--cwd DIR] [--timeout S] [--clean-env]"
        " [--token T] [--session ID] -- COMMAND...",
        description="Run COMMAND for real under the policy: only DIR is writable, no network, "
        "no privileges. Exits with the command's status; 126 if the policy denies it, 125 if "
        "it asks (approve first, then pass --token or use a session).",
    )
    run.add_argument("--cwd", metavar="DIR", help="the directory to run in (default: .)")
    run.add_argument("--timeout", metavar="S", type=seconds, help="time limit in seconds")
    run.add_argument(
        "--clean-env",
        action="store_true",
        help="send no environment (default: this shell's environment)",
    )
    run.add_argument("--token", default="", help="an approval token from `airlock approve`")
    run.add_argument("--session", default="", metavar="ID", help="the caller's session id")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND")
    run.set_defaults(subparser=run)

    apply = sub.add_parser(
        "apply", parents=[socket], help="write a validation's dry-run changes to the host"
    )
    apply.add_argument("validation_id", metavar="ID")
    discard = sub.add_parser("discard", parents=[socket], help="drop the changes a validation kept")
    discard.add_argument("validation_id", metavar="ID")
    _approvals.add_parsers(sub, socket)  # pending, approve


def _run(args: argparse.Namespace, out: Console, err: Console) -> int:
    command = " ".join(args.command)
    waiting = _stdin.waiting_bytes(sys.stdin.fileno()) if sys.stdin is not None else 0
    if waiting:
        # A warning, not a refusal: `bash < script.sh` (or `ssh host bash -s < script`) that
        # calls airlock run has the rest of its script waiting here, and must keep working.
        err.print(
            f"airlock: warning: {waiting} bytes are waiting on standard input, but `airlock "
            "run` does not pass input to the command (it reads end of file). To give it "
            "input, put it in a file under the working directory and redirect inside the "
            "command: airlock run -- 'COMMAND < input.txt'",
            markup=False,
        )
    env = {} if args.clean_env else environment(err)
    stdout, stderr = sys.stdout.buffer, sys.stderr.buffer
    with Client(args.socket) as client:
        try:
            for event in client.execute(
                command,
                cwd=args.cwd,
                env=env,
                timeout=args.timeout,
                approval_token=args.token,
                session_id=args.session,
            ):
                if isinstance(event, types.ExecOutput):
                    target = stdout if event.stream == 1 else stderr
                    target.write(event.data)
                    target.flush()
                elif isinstance(event, types.NetworkAttemptInfo):
                    _network_refusal(event, err)
                elif isinstance(event, types.ExecFinished):
                    return _exit_status(event, err)
        except PermissionDenied as e:
            if e.reason != "POLICY_DENIED":
                raise
            err.print(f"airlock: denied: {escape_controls(e.message)}", markup=False)
            return EXIT_DENIED
        except FailedPrecondition as e:
            if e.reason != "APPROVAL_REQUIRED":
                raise
            # Show what it would do (a dry run), and how to let it through.
            v = client.validate(command, cwd=args.cwd, env=env, session_id=args.session)
            show(err, render_validation(v, ReportBounds()))
            if v.verdict is types.Verdict.DENY:  # what the dry run saw: no approval can help
                err.print(
                    "airlock: denied: the policy asks before this runs, and what its dry run "
                    "did is denied, so it cannot be approved",
                    markup=False,
                )
                return EXIT_DENIED
            err.print(
                f"airlock: the policy asks before this runs. To allow it once:\n"
                f"  airlock approve {v.validation_id}   (then: airlock run --token TOKEN -- ...)",
                markup=False,
            )
            return EXIT_ASKED
    err.print("airlock: error: the daemon ended the stream without a result", markup=False)
    return 1


def _network_refusal(a: types.NetworkAttemptInfo, err: Console) -> None:
    """One line on standard error for a connection the policy refused (the command sees
    only a reset); forwarded ones and lookups are in the audit log, not on the terminal."""
    if not a.refusal or a.protocol is types.NetProtocol.DNS:
        return
    host = a.dns_name or a.host
    where = f"[{host}]:{a.port}" if ":" in host else f"{host}:{a.port}"
    why = a.refusal_detail or a.refusal
    if a.refusal == "no-grant":
        line = suggestion(a.dns_name, a.address, a.port)
        why += f" (`{line}` under egress.execute.allow would allow it)"
    err.print(f"airlock: refused {where}: {escape_controls(why)}", markup=False)


def _exit_status(end: types.ExecFinished, err: Console) -> int:
    if end.termination is types.Termination.EXITED:
        return end.exit_code
    what = {
        types.Termination.SIGNALED: f"was killed by signal {end.signal}",
        types.Termination.TIMED_OUT: "timed out; its process tree was killed",
        types.Termination.OUT_OF_MEMORY: "was killed for exceeding the memory limit",
        types.Termination.CANCELLED: "was cancelled",
    }.get(end.termination, end.termination.name.lower())
    err.print(f"airlock: the command {what}", markup=False)
    return 128 + (end.signal or 9)


def _apply(args: argparse.Namespace, out: Console, err: Console) -> int:
    with Client(args.socket) as client:
        result = client.apply(args.validation_id)
    verb = "Already applied" if result.replayed else "Applied"
    out.print(f"{verb}: {len(result.applied_paths)} path(s).", markup=False)
    for path in result.applied_paths:
        out.print(f"  {escape_controls(path.decode(errors='backslashreplace'))}", markup=False)
    return 0


def _discard(args: argparse.Namespace, out: Console, err: Console) -> int:
    with Client(args.socket) as client:
        client.discard(args.validation_id)
    out.print("Discarded.", markup=False)
    return 0


def offer_apply(client: Client, v: types.Validation, out: Console) -> None:
    """In a terminal, after a validation: "Apply these changes? [y/N]" (approving an ask)."""
    if not v.changes_digest or v.verdict is types.Verdict.DENY:
        return
    if v.verdict is types.Verdict.ASK and not _may_approve_own(client, v):
        # The daemon would refuse this caller's approval (SELF_APPROVAL_NOT_ALLOWED): no
        # question it cannot honour, but who can let it through.
        out.print(
            f"Not applied: an approver must approve it as another user (airlock approve "
            f"{v.validation_id}); then: airlock apply {v.validation_id}",
            markup=False,
        )
        return
    question = "Approve and apply these changes? [y/N] "
    if v.verdict is types.Verdict.ALLOW:
        question = "Apply these changes? [y/N] "
    try:
        answer = input(question)
    except EOFError:
        return
    if answer.strip().lower() not in ("y", "yes"):
        later = f"airlock apply {v.validation_id}"
        if v.verdict is types.Verdict.ASK:  # Apply needs the approval first
            later = f"airlock approve {v.validation_id} (an approver), then {later}"
        out.print(f"Not applied. Later: {later}", markup=False)
        return
    try:
        if v.verdict is types.Verdict.ASK:
            client.approve(v.validation_id)
        result = client.apply(v.validation_id)
    except AirlockError as e:
        out.print(f"Not applied: {escape_controls(str(e))}", markup=False)
        if e.reason in ("SELF_APPROVAL_NOT_ALLOWED", "NOT_AN_APPROVER"):
            out.print(
                f"An approver approves it (airlock approve {v.validation_id}); then: "
                f"airlock apply {v.validation_id}",
                markup=False,
            )
        return
    out.print(f"Applied {len(result.applied_paths)} path(s).", markup=False)


def _may_approve_own(client: Client, v: types.Validation) -> bool:
    """Whether the daemon would let this process approve validation ``v``: always worth
    asking for another uid's (the daemon knows its approvers); for this uid's own ask, only
    when the daemon allows self-approval (an older daemon does not say: it is taken as no)."""
    if v.uid != os.getuid():
        return True
    try:
        return client.capabilities().allow_self_approval
    except AirlockError:
        return False


ACTIONS: dict[str, Action] = {
    "run": _run,
    "apply": _apply,
    "discard": _discard,
    **_approvals.ACTIONS,
}
