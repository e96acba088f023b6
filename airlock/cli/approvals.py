"""``airlock pending`` and ``airlock approve``: a person reviews an ask, then approves it.

The daemon lets only its approvers (root, and the users and groups of its ``approvers``
and ``approver-groups``) approve, and never the validation's own user unless its operator
set ``allow-self-approval``: an agent cannot approve its own ask. This is the approver's
side of it:

* ``airlock pending`` lists what waits for an approval (an approver sees every user's,
  anyone else their own); ``--watch`` keeps printing new asks as they come.
* ``airlock approve ID`` shows what approving would let through (the dry run's summary,
  findings, changes with their diffs, network attempts, and what the agent said it was
  doing), then asks "Approve? [y/N]" on the terminal. Without a terminal it refuses
  unless ``--yes`` is given (scripts). The review and the prompt go to standard error,
  the token alone to standard output, so ``TOKEN=$(airlock approve ID)`` works.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from rich.console import Console

from airlock import types
from airlock.cli._pager import show
from airlock.cli.render import ALL, ReportBounds, escape_controls, render_validation, verdict_line
from airlock.client import Client

__all__ = ["ACTIONS", "add_parsers", "describe_agent", "render_pending"]

Action = Callable[[argparse.Namespace, Console, Console], int]
EXIT_USAGE = 2


def add_parsers(sub: Any, socket: argparse.ArgumentParser) -> None:
    pending = sub.add_parser(
        "pending",
        parents=[socket],
        help="list the validations waiting for an approval (an approver sees everyone's)",
        description="List the validations waiting for an approval, oldest first: every "
        "user's for one of the daemon's approvers, your own otherwise.",
    )
    pending.add_argument(
        "--watch",
        action="store_true",
        help="then keep printing each new ask as it comes (Ctrl-C ends it)",
    )
    approve = sub.add_parser(
        "approve",
        parents=[socket],
        help="review a validation the policy asked about, and approve it",
        description="Show what the validation would let through (summary, findings, changes "
        "and diffs, network attempts, the agent's context) and ask for confirmation, then "
        "approve it and print the approval's token on standard output. Only the daemon's "
        "approvers may, and not the validation's own user (unless the daemon's operator "
        "set allow-self-approval).",
    )
    approve.add_argument("validation_id", metavar="ID")
    approve.add_argument(
        "--session",
        action="store_true",
        help="approve the same command in the same session until it ends (default: once)",
    )
    approve.add_argument(
        "--special",
        action="append",
        default=[],
        metavar="PATH",
        help="let Apply write this privileged file of the validation (made setuid or setgid, "
        "given file capabilities, or a device node): it writes none the approval does not "
        "name (repeat for each); FIFOs and sockets need no approval",
    )
    approve.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="approve without asking (for scripts: review it first with `airlock pending`)",
    )
    approve.add_argument(
        "--all",
        action="store_true",
        help="list every change and every diff in full (default: bounded as `airlock validate`)",
    )
    approve.add_argument(
        "--no-pager", action="store_true", help="never page the report (see `airlock validate`)"
    )


def describe_agent(agent: types.AgentContext | None) -> str:
    """One line on what the agent said it was doing ("" if it said nothing)."""
    if agent is None:
        return ""
    who = " ".join(filter(None, (agent.agent_name or "agent", agent.agent_version)))
    parts = [who]
    if agent.tool_description:
        parts.append(f'"{agent.tool_description}"')
    if agent.session_id:
        parts.append(f"session {agent.session_id}")
    if agent.tool_use_id:
        parts.append(f"tool call {agent.tool_use_id}")
    if agent.transcript_path:
        parts.append(f"transcript {agent.transcript_path}")
    line = escape_controls(" · ".join(parts))
    if agent.prompt_excerpt:
        prompt = escape_controls(" ".join(agent.prompt_excerpt.split()))
        line += f"\n  prompt: {prompt[:300]}{'...' if len(prompt) > 300 else ''}"
    return line


def _when(epoch: float) -> str:
    left = epoch - time.time()
    stamp = datetime.datetime.fromtimestamp(epoch).strftime("%H:%M:%S")
    return f"{stamp} (in {max(0, int(left // 60))} min)"


def render_pending(p: types.PendingValidation) -> str:
    """A few lines about one pending validation."""
    lines = [
        f"{p.validation_id}  uid {p.uid} gid {p.gid}  expires {_when(p.expires_at)}"
        + (f"  session {escape_controls(p.session_id)}" if p.session_id else ""),
        f"  $ {escape_controls(p.command)}",
        f"  in {escape_controls(p.cwd)}",
    ]
    if p.summary:
        lines.append(f"  {escape_controls(' '.join(p.summary.split()))}")
    agent = describe_agent(p.agent)
    if agent:
        lines.append(f"  agent: {agent}")
    return "\n".join(lines)


def _pending(args: argparse.Namespace, out: Console, err: Console) -> int:
    with Client(args.socket) as client:
        if not args.watch:
            found = client.list_pending()
            if not found:
                err.print("Nothing is waiting for an approval.", markup=False)
            for p in found:
                out.print(render_pending(p), markup=False, soft_wrap=True)
            return 0
        stream = client.watch_pending()
        try:
            while True:
                for item in stream:
                    if item is not None:
                        out.print(render_pending(item), markup=False, soft_wrap=True)
                # The daemon ends a watch after a while: open the next one.
                stream = client.watch_pending()
        except KeyboardInterrupt:
            stream.cancel()
            return 0


def _confirm(question: str, stdin: TextIO, err: Console) -> bool:
    err.print(question, end="", markup=False)
    err.file.flush()
    answer = stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def _approve(args: argparse.Namespace, out: Console, err: Console) -> int:
    with Client(args.socket) as client:
        if not args.yes and not sys.stdin.isatty():
            err.print(
                "airlock: approve: standard input is not a terminal, so nobody can confirm: "
                "review it with `airlock pending`, then pass --yes",
                markup=False,
            )
            return EXIT_USAGE
        review = next(
            (p for p in client.list_pending() if p.validation_id == args.validation_id), None
        )
        if review is None:
            err.print(
                f"Validation {escape_controls(args.validation_id)} is not waiting for an "
                "approval you can see (its own user sees it, an approver sees all).",
                markup=False,
            )
        elif review.validation is not None:
            bounds = ALL if args.all else ReportBounds()
            show(err, render_validation(review.validation, bounds), paging=not args.no_pager)
            agent = describe_agent(review.agent)
            if agent:
                err.print(f"Agent: {agent}", markup=False)
            err.print(
                f"Asked by uid {review.uid} gid {review.gid}, in {escape_controls(review.cwd)}",
                markup=False,
            )
        else:
            err.print(render_pending(review), markup=False)
            err.print(
                "(the daemon no longer holds this dry run's details: it restarted, or many "
                "newer asks came; only its summary is shown)",
                markup=False,
            )
        what = "for the session" if args.session else "once"
        if not args.yes and review is not None and review.validation is not None:
            # The report may be long: the verdict again, right above the question.
            err.print()
            err.print(verdict_line(review.validation))
        if not args.yes and not _confirm(f"Approve it {what}? [y/N] ", sys.stdin, err):
            err.print("Not approved.", markup=False)
            return 1
        grant = client.approve(args.validation_id, session=args.session, special_paths=args.special)
    # The token alone on stdout, so that `TOKEN=$(airlock approve ID)` works.
    print(grant.approval_token)
    err.print(f"approved ({what}); the token above is shown only now", markup=False)
    return 0


ACTIONS: dict[str, Action] = {
    "pending": _pending,
    "approve": _approve,
}
