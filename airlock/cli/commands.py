"""The daemon's commands of ``airlock`` (validate, run, apply, audit ...): parsing and output.

:mod:`airlock.cli.main` is the entry point; it imports this module only for these
commands, so that ``airlock hook`` and ``airlock policy`` do not pay for grpc's
channel set-up code, rich and the audit types they do not use.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console

from airlock import types
from airlock._errors import AirlockError
from airlock._version import __version__
from airlock.api.convert import (
    audit_event_from_proto,
    capabilities_from_proto,
    validation_from_proto,
    verify_result_from_proto,
)
from airlock.audit import (
    MAX_PAGE_SIZE,
    Anchor,
    AuditFilter,
    StoredEvent,
    encode_event,
    parse_anchor,
)
from airlock.cli import workflow as _workflow_cli
from airlock.cli._env import environment
from airlock.cli._exit import EXIT_ASK, EXIT_DENY, EXIT_ERROR, EXIT_OK, EXIT_USAGE
from airlock.cli._pager import show
from airlock.cli.render import (
    ALL,
    ReportBounds,
    escape_controls,
    render_audit_events,
    render_audit_verify,
    render_capabilities,
    render_validation,
    verdict_line,
)
from airlock.client import DEFAULT_SOCKET_PATH, Client

__all__ = ["main"]

_EXIT_OF_VERDICT = {
    types.Verdict.ALLOW: EXIT_OK,
    types.Verdict.ASK: EXIT_ASK,
    types.Verdict.DENY: EXIT_DENY,
}


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number of seconds: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="airlock",
        description="Judge a shell command by a dry run in the Airlock daemon's sandbox.",
        epilog="Exit status: 0 allow, 3 ask, 4 deny, 1 error, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"airlock {__version__}")
    socket = argparse.ArgumentParser(add_help=False)
    socket.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help=f"the daemon's Unix socket (default: $AIRLOCK_SOCKET, else {DEFAULT_SOCKET_PATH})",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    validate = sub.add_parser(
        "validate",
        parents=[socket],
        help="dry-run a command and print the verdict",
        usage="airlock validate [-h] [--socket PATH] [--cwd DIR] [--timeout S] [--json | -q]"
        " [--clean-env] [--force-dry-run] -- COMMAND...",
        description="Dry-run COMMAND (its words joined by spaces into one bash command line) "
        "in a throwaway sandbox and report what it did and the verdict.",
    )
    validate.add_argument(
        "--cwd", metavar="DIR", help="the directory to run in, also the workspace (default: .)"
    )
    validate.add_argument(
        "--timeout", metavar="S", type=_seconds, help="the command's time limit in seconds"
    )
    shown = validate.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the response as protobuf JSON")
    shown.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only the validation id (for `airlock apply` and `approve`); the exit "
        "status still gives the verdict",
    )
    validate.add_argument(
        "--clean-env",
        action="store_true",
        help="send no environment (default: this shell's environment)",
    )
    validate.add_argument(
        "--force-dry-run",
        action="store_true",
        help="run the dry run even when the static pass already denies the command",
    )
    size = validate.add_mutually_exclusive_group()
    size.add_argument(
        "--summary",
        action="store_true",
        help="print only the verdict, the summary and the findings",
    )
    size.add_argument(
        "--all",
        action="store_true",
        help=f"list every change, every diff and the output in full (default: the first "
        f"{_BOUNDS.changes} changes, the diffs of the first {_BOUNDS.diff_files} files, "
        f"{_BOUNDS.diff_lines} lines each, and the first {_BOUNDS.output_lines} lines of "
        "each output stream)",
    )
    validate.add_argument("--no-diff", action="store_true", help="leave the diffs out")
    validate.add_argument(
        "--no-pager",
        action="store_true",
        help="never page the report (default: in a terminal, a report taller than it goes "
        "through $AIRLOCK_PAGER, $PAGER or less)",
    )
    validate.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command's words"
    )
    validate.set_defaults(subparser=validate)

    capabilities = sub.add_parser(
        "capabilities", parents=[socket], help="print what the host and daemon support"
    )
    capabilities.add_argument(
        "--json", action="store_true", help="print the response as protobuf JSON"
    )

    sub.add_parser("health", parents=[socket], help="check that the daemon is serving")
    _workflow_cli.add_parsers(sub, socket, _seconds)
    _add_audit_parser(sub, socket)
    # Listed for --help only: airlock.cli.main hands "policy ..." to airlock.cli.policy.
    sub.add_parser("policy", help="lint, test and explain policies (no daemon needed)")
    # Likewise "hook ..." goes to airlock.cli.hook and "mcp ..." to airlock.cli.mcp.
    sub.add_parser(
        "hook", help="answer a coding agent's pre-shell hook (claude, codex, ...); install it"
    )
    sub.add_parser("mcp", help="serve the daemon's tools to an MCP client (stdio or HTTP)")
    return parser


def _print_json(msg: Message) -> None:
    sys.stdout.write(json_format.MessageToJson(msg) + "\n")


_BOUNDS = ReportBounds()


def _bounds(args: argparse.Namespace) -> ReportBounds:
    bounds = ALL if args.all else _BOUNDS
    if args.summary:
        bounds = dataclasses.replace(bounds, summary_only=True)
    if args.no_diff:
        bounds = dataclasses.replace(bounds, diff_files=0)
    return bounds


def _validate(args: argparse.Namespace, out: Console, err: Console) -> int:
    command = " ".join(args.command)
    env = {} if args.clean_env else environment(err)
    with Client(args.socket) as client:
        response = client.validate_raw(
            command,
            cwd=args.cwd,
            env=env,
            timeout=args.timeout,
            force_dry_run=args.force_dry_run,
        )
        validation = validation_from_proto(response)
        if args.json:
            _print_json(response)
        elif args.quiet:
            sys.stdout.write(f"{validation.validation_id}\n")
        else:
            show(out, render_validation(validation, _bounds(args)), paging=not args.no_pager)
            if sys.stdin.isatty() and sys.stdout.isatty():
                if validation.changes_digest and validation.verdict is not types.Verdict.DENY:
                    # The report may be long: the verdict again, right above the question.
                    out.print()
                    out.print(verdict_line(validation))
                _workflow_cli.offer_apply(client, validation, out)
    return _EXIT_OF_VERDICT.get(validation.verdict, EXIT_DENY)


def _capabilities(args: argparse.Namespace, out: Console, err: Console) -> int:
    with Client(args.socket) as client:
        response = client.capabilities_raw()
    if args.json:
        _print_json(response)
    else:
        out.print(render_capabilities(capabilities_from_proto(response)))
    return EXIT_OK


def _health(args: argparse.Namespace, out: Console, err: Console) -> int:
    with Client(args.socket) as client:
        serving = client.health()
    out.print("SERVING" if serving else "NOT_SERVING", markup=False, highlight=False)
    return EXIT_OK if serving else EXIT_ERROR


# --- airlock audit ... ---------------------------------------------------------------

_AGO = re.compile(r"(\d+)\s*([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _when(text: str) -> int:
    """A time as nanoseconds since the epoch: ISO 8601 (local unless it has an offset),
    or a duration ago (``90s``, ``15m``, ``2h``, ``7d``)."""
    ago = _AGO.fullmatch(text.strip())
    if ago:
        return time.time_ns() - int(ago[1]) * _UNIT_S[ago[2]] * 1_000_000_000
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (examples: 2h, 7d, 2025-01-31, 2025-01-31T14:00:00+01:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a naive time is local time
    return round(moment.timestamp() * 1_000_000) * 1000


def _anchor(text: str) -> Anchor:
    try:
        return parse_anchor(text)
    except AirlockError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _natural(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a whole number >= 0: {text!r}")
    return int(text)


def _add_audit_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], socket: argparse.ArgumentParser
) -> None:
    audit = sub.add_parser(
        "audit",
        help="list, verify or export the daemon's audit log (root only)",
        description="The daemon's append-only, hash-chained record of every decision. "
        "Only root may read it.",
    )
    actions = audit.add_subparsers(dest="audit_action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        parents=[socket],
        help="list events, oldest first",
        description="List the audit log's events that match every filter given, oldest first.",
    )
    when = "an ISO 8601 time (local unless it has an offset) or a duration ago (90s, 15m, 2h, 7d)"
    listing.add_argument("--since", metavar="WHEN", type=_when, help=f"from WHEN on: {when}")
    listing.add_argument("--until", metavar="WHEN", type=_when, help="before WHEN")
    listing.add_argument("--verdict", choices=["allow", "ask", "deny"], help="only this verdict")
    listing.add_argument("--rule", metavar="ID", help="only events with a finding of rule ID")
    listing.add_argument("--session", metavar="ID", help="only events of session ID")
    listing.add_argument("--uid", type=_natural, help="only events of callers with this user id")
    listing.add_argument(
        "--agent", metavar="NAME", help="only events whose agent context names agent NAME"
    )
    listing.add_argument("--tool-use", metavar="ID", help="only events of the agent's tool call ID")
    listing.add_argument(
        "--limit",
        metavar="N",
        type=_natural,
        default=100,
        help="show at most N events (default 100; 0: all)",
    )
    listing.add_argument(
        "--json", action="store_true", help="one AuditEvent per line, in protobuf's JSON mapping"
    )
    verify = actions.add_parser(
        "verify",
        parents=[socket],
        help="check the hash chain (exit 0 intact, 1 problem)",
        description="Walk the audit log's hash chain and report the first event that was "
        "edited, deleted or moved. Exit status: 0 intact, 1 a problem (or an error).",
    )
    verify.add_argument(
        "--anchor",
        metavar="SEQ:HASH",
        type=_anchor,
        help="an earlier head kept elsewhere: also finds events cut from the end, and a "
        "chain rewritten up to it",
    )
    verify.add_argument("--json", action="store_true", help="print the response as protobuf JSON")
    export = actions.add_parser(
        "export",
        parents=[socket],
        help="write every event as JSON lines",
        description="Write every event of the audit log, oldest first, one line each: "
        '{"event":BODY,"hash":H,"prev_hash":P,"seq":N} with BODY the canonical encoding, '
        "so that the chain can be re-verified elsewhere (docs/decisions.md).",
    )
    export.add_argument(
        "--jsonl", action="store_true", required=True, help="JSON lines (the only format)"
    )
    export.add_argument(
        "file", nargs="?", default="-", metavar="FILE", help="where to write (default: stdout)"
    )


def _audit_list(args: argparse.Namespace, out: Console, err: Console) -> int:
    audit_filter = AuditFilter(
        since_ns=args.since,
        until_ns=args.until,
        verdict=types.Verdict[args.verdict.upper()] if args.verdict else None,
        rule_id=args.rule,
        session_id=args.session,
        uid=args.uid,
        agent_name=args.agent,
        tool_use_id=args.tool_use,
    )
    limit: int = args.limit
    events: list[StoredEvent] = []
    count, more = 0, False
    with Client(args.socket) as client:
        token: str | None = None
        while True:
            size = min(MAX_PAGE_SIZE, limit - count) if limit else MAX_PAGE_SIZE
            response = client.list_audit_events_raw(audit_filter, page_size=size, page_token=token)
            for msg in response.events:
                if args.json:
                    # Every field, zeros included: uid 0 is root, not "unknown".
                    line = json_format.MessageToJson(
                        msg, indent=None, always_print_fields_with_no_presence=True
                    )
                    sys.stdout.write(line + "\n")
                else:
                    events.append(audit_event_from_proto(msg))
            count += len(response.events)
            token = response.next_page_token or None
            if token is None:
                break
            if limit and count >= limit:
                more = True
                break
    if not args.json:
        if events:
            out.print(render_audit_events(events))
        else:
            out.print("No events.", markup=False, highlight=False)
    if more:
        err.print(
            f"airlock: showed the first {count} events; there are more "
            "(raise --limit, or start later with --since)",
            markup=False,
            highlight=False,
        )
    return EXIT_OK


def _audit_verify(args: argparse.Namespace, out: Console, err: Console) -> int:
    with Client(args.socket) as client:
        response = client.verify_audit_log_raw(args.anchor)
    result = verify_result_from_proto(response)
    if args.json:
        _print_json(response)
    else:
        out.print(render_audit_verify(result))
    return EXIT_OK if result.ok else EXIT_ERROR


def _jsonl_line(stored: StoredEvent) -> bytes:
    """One line of ``AuditLog.export_jsonl``: an external verifier recomputes its hash."""
    tail = f',"hash":"{stored.hash}","prev_hash":"{stored.prev_hash}","seq":{stored.seq}}}\n'
    return b'{"event":' + encode_event(stored.event) + tail.encode()


def _audit_export(args: argparse.Namespace, out: Console, err: Console) -> int:
    with Client(args.socket) as client:
        if args.file == "-":
            for stored in client.audit_events():
                sys.stdout.buffer.write(_jsonl_line(stored))
            sys.stdout.buffer.flush()
            return EXIT_OK
        # Into a temporary file, renamed when complete: a failed export leaves no
        # partial file that looks like a whole log.
        path = os.path.abspath(args.file)
        tmp = f"{path}.{os.getpid()}.tmp"
        count = 0
        try:
            # 0600 from the first byte: the log holds every user's commands (root only).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                for stored in client.audit_events():
                    f.write(_jsonl_line(stored))
                    count += 1
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    err.print(f"airlock: exported {count} events to {path}", markup=False, highlight=False)
    return EXIT_OK


_AUDIT_ACTIONS: dict[str, Callable[[argparse.Namespace, Console, Console], int]] = {
    "list": _audit_list,
    "verify": _audit_verify,
    "export": _audit_export,
}


def _audit(args: argparse.Namespace, out: Console, err: Console) -> int:
    return _AUDIT_ACTIONS[args.audit_action](args, out, err)


_ACTIONS: dict[str, Callable[[argparse.Namespace, Console, Console], int]] = {
    "validate": _validate,
    "capabilities": _capabilities,
    "health": _health,
    "audit": _audit,
    **_workflow_cli.ACTIONS,
}


def main(argv: Sequence[str] | None = None) -> int:
    """The daemon's commands with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
        if args.action in ("validate", "run"):
            words: list[str] = args.command
            args.command = words[1:] if words[:1] == ["--"] else words
            if not args.command:
                args.subparser.error("a COMMAND is required, after --")
    except SystemExit as e:  # --help, --version or a usage error
        if e.code is None:
            return EXIT_OK
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    out = Console(highlight=False, width=_width(sys.stdout))
    err = Console(stderr=True, highlight=False, width=_width(sys.stderr))
    try:
        return _ACTIONS[args.action](args, out, err)
    except AirlockError as e:
        print(f"airlock: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("airlock: error: interrupted [CANCELLED]", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unexpected local failure: still one line
        print(f"airlock: error: {_one_line(f'{type(e).__name__}: {e}')} [CLIENT]", file=sys.stderr)
        return EXIT_ERROR


# Piped or redirected output is not cut into lines (rich would wrap at 80 columns): a line is
# as long as its content, up to this.
_PIPE_WIDTH = 4096


def _width(stream: object) -> int | None:
    """The console width: the terminal's (rich finds it), $COLUMNS, else no wrapping."""
    isatty = getattr(stream, "isatty", None)
    if (callable(isatty) and isatty()) or os.environ.get("COLUMNS"):
        return None
    return _PIPE_WIDTH


def _one_line(text: str) -> str:
    return escape_controls(" ".join(text.split()))
