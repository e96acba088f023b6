"""Readable reports for the CLI: pure functions from ``airlock.types`` to rich renderables.

Everything that came from the command (paths, output, diffs) or the daemon (summary,
messages) is shown as plain :class:`~rich.text.Text`, never as markup, and with
control characters escaped, so a hostile file name or output cannot restyle the
report or drive the terminal.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from airlock import types
from airlock._notkept import not_kept_advice
from airlock._special import Special, change_specials
from airlock.audit import AuditEvent, StoredEvent, VerifyResult

__all__ = [
    "ALL",
    "ReportBounds",
    "change_label",
    "change_tree",
    "diffs",
    "display_path",
    "escape_controls",
    "findings_table",
    "human_size",
    "output_panel",
    "render_audit_events",
    "render_audit_verify",
    "render_capabilities",
    "render_validation",
    "termination_text",
    "timings_text",
    "verdict_line",
    "verdict_style",
    "verdict_text",
]

_VERDICT_STYLES = {
    types.Verdict.ALLOW: "bold green",
    types.Verdict.ASK: "bold yellow",
    types.Verdict.DENY: "bold red",
}
_SEVERITY_STYLES = {
    types.Severity.INFO: "dim",
    types.Severity.LOW: "cyan",
    types.Severity.MEDIUM: "yellow",
    types.Severity.HIGH: "red",
    types.Severity.CRITICAL: "bold red",
}
# (marker, style) for each kind of change.
_KIND_MARKS = {
    types.ChangeKind.CREATED: ("+", "green"),
    types.ChangeKind.MODIFIED: ("~", "yellow"),
    types.ChangeKind.DELETED: ("-", "red"),
    types.ChangeKind.METADATA_CHANGED: ("m", "blue"),
}
_TYPE_NAMES = {
    types.FileType.NONE: "nothing",
    types.FileType.REGULAR: "file",
    types.FileType.DIRECTORY: "directory",
    types.FileType.SYMLINK: "symlink",
    types.FileType.OTHER: "special file",
}
_OUTSIDE_STYLE = "bold red"
# Bidirectional overrides and isolates reorder what the terminal shows.
_BIDI_CONTROLS = frozenset(range(0x202A, 0x202F)) | frozenset(range(0x2066, 0x206A))


def escape_controls(text: str, *, multiline: bool = False) -> str:
    """``text`` with control characters written as ``\\xNN``/``\\uNNNN`` escapes.

    With ``multiline``, newlines and tabs are kept and ``\\r\\n`` becomes ``\\n``.
    """
    if multiline:
        text = text.replace("\r\n", "\n")
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if multiline and ch in "\n\t":
            out.append(ch)
        elif code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif code in _BIDI_CONTROLS:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def display_path(raw: bytes) -> str:
    """A path for display: UTF-8 with invalid bytes as ``\\xNN``, controls escaped."""
    return escape_controls(raw.decode("utf-8", errors="backslashreplace"))


def human_size(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps the number at least 1."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# --- verdict and findings -----------------------------------------------------------


def verdict_style(verdict: types.Verdict) -> str:
    return _VERDICT_STYLES.get(verdict, "bold red")


def verdict_text(verdict: types.Verdict) -> Text:
    return Text(verdict.name, style=verdict_style(verdict))


def findings_table(findings: Sequence[types.Finding]) -> Table:
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    table.add_column("verdict", no_wrap=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("rule", no_wrap=True)
    table.add_column("finding", ratio=1)
    for f in findings:
        message = Text(escape_controls(f.message))
        if f.subcommand:
            message.append("\n")
            message.append(f"in: {escape_controls(f.subcommand)}", style="dim")
        table.add_row(
            verdict_text(f.verdict),
            Text(f.severity.name, style=_SEVERITY_STYLES.get(f.severity, "")),
            Text(f"{escape_controls(f.rule_id)} ({f.source.name.lower()})"),
            message,
        )
    return table


# --- changes -----------------------------------------------------------------------


def _change_details(c: types.FileChange) -> list[str]:
    details: list[str] = []
    kind = c.kind
    if (
        kind is types.ChangeKind.MODIFIED
        and c.previous_file_type is not types.FileType.NONE
        and c.previous_file_type is not c.file_type
    ):
        details.append(f"was {_TYPE_NAMES[c.previous_file_type]}, now {_TYPE_NAMES[c.file_type]}")
    if c.file_type is types.FileType.REGULAR:
        if kind is types.ChangeKind.MODIFIED and c.size_before is not None:
            if c.size_after is not None:
                details.append(f"{human_size(c.size_before)} → {human_size(c.size_after)}")
        elif kind is types.ChangeKind.DELETED and c.size_before is not None:
            details.append(human_size(c.size_before))
        elif kind is not types.ChangeKind.DELETED and c.size_after is not None:
            details.append(human_size(c.size_after))
    if kind is types.ChangeKind.DELETED and c.entries_deleted:
        plural = "entry" if c.entries_deleted == 1 else "entries"
        details.append(f"{c.entries_deleted} {plural}")
    if c.mode_before is not None and c.mode_after is not None and c.mode_before != c.mode_after:
        details.append(f"mode {c.mode_before & 0o7777:04o} → {c.mode_after & 0o7777:04o}")
    elif kind is types.ChangeKind.CREATED and c.mode_after is not None:
        details.append(f"mode {c.mode_after & 0o7777:04o}")
    if kind is types.ChangeKind.METADATA_CHANGED and c.uid_after is not None:
        details.append(f"owner {c.uid_after}:{c.gid_after if c.gid_after is not None else '?'}")
    if c.other_type is not types.OtherType.NONE:
        details.append(c.other_type.name.lower().replace("_", " "))
    specials = change_specials(c)
    details += [s.value for s in (Special.SETUID, Special.SETGID) if s in specials]
    if c.capabilities:
        details.append(f"capabilities {c.capabilities}")
    if c.binary:
        details.append("binary")
    if c.diff_truncated:
        details.append("diff truncated")
    if c.unreadable:
        details.append("content not readable by the caller: not shown")
    return details


def change_label(c: types.FileChange, *, name: str | None = None) -> Text:
    """One change on one line: coloured marker, name, type, sizes, workspace mark."""
    marker, style = _KIND_MARKS.get(c.kind, ("?", "magenta"))
    label = Text()
    label.append(f"{marker} ", style=f"bold {style}")
    label.append(name if name is not None else display_path(c.path), style=style)
    if c.file_type is types.FileType.DIRECTORY:
        label.append("/", style=style)
    elif c.file_type is types.FileType.SYMLINK:
        label.append(" -> ", style="dim")
        label.append(display_path(c.symlink_target), style="cyan")
    elif c.file_type is types.FileType.OTHER:
        label.append(" (special file)", style="dim")
    details = _change_details(c)
    if details:
        label.append(f"  ({', '.join(details)})", style="dim")
    if not c.in_workspace:
        label.append("  ⚠ outside workspace", style=_OUTSIDE_STYLE)
    return label


def change_tree(
    changes: Sequence[types.FileChange], *, truncated: bool = False, limit: int | None = None
) -> Tree:
    """The changes grouped by parent directory, directories and entries sorted; with
    ``limit``, only the first ``limit`` paths (in path order) and how many more there are."""
    outside = sum(1 for c in changes if not c.in_workspace)
    title = Text(f"Changes: {len(changes)}", style="bold")
    if outside:
        title.append(f" ({outside} outside the workspace)", style=_OUTSIDE_STYLE)
    tree = Tree(title, guide_style="dim")
    shown = list(changes)
    if limit is not None and len(shown) > limit:
        # Outside the workspace first: those are the ones a reader must not miss.
        shown = sorted(shown, key=lambda c: (c.in_workspace, c.path))[:limit]
    groups: dict[bytes, list[tuple[bytes, types.FileChange]]] = {}
    for c in shown:
        path = c.path.rstrip(b"/") or c.path
        parent, base = os.path.split(path)
        groups.setdefault(parent or b".", []).append((base or path, c))
    for parent in sorted(groups):
        branch = tree.add(Text(display_path(parent), style="bold"))
        for base, c in sorted(groups[parent], key=lambda item: item[0]):
            branch.add(change_label(c, name=display_path(base)))
    if len(shown) < len(changes):
        tree.add(
            Text(
                f"… and {len(changes) - len(shown)} more (--all lists every change; "
                "--json prints them all)",
                style="bold yellow",
            )
        )
    if truncated:
        tree.add(Text("… more changes were made than the daemon reports", style="bold yellow"))
    return tree


def diffs(
    changes: Iterable[types.FileChange],
    *,
    max_files: int | None = None,
    max_lines: int | None = None,
) -> list[RenderableType]:
    """A titled unified diff for every change that carries one; with the bounds, the diffs
    of the first ``max_files`` files, each cut after ``max_lines`` lines, and what was left
    out."""
    out: list[RenderableType] = []
    with_diff = [c for c in changes if c.unified_diff]
    for c in with_diff[:max_files]:
        title = Text("diff ", style="bold")
        title.append(display_path(c.path))
        if c.diff_truncated:
            title.append("  (truncated)", style="yellow")
        lines = escape_controls(c.unified_diff, multiline=True).rstrip("\n").split("\n")
        cut = max_lines is not None and len(lines) > max_lines
        if cut and max_lines is not None:
            title.append(f"  (first {max_lines} of {len(lines)} lines)", style="yellow")
            lines = lines[:max_lines]
        out.append(Text(""))
        out.append(title)
        out.append(Syntax("\n".join(lines), "diff", theme="ansi_dark", background_color="default"))
    if max_files is not None and len(with_diff) > max_files:
        out.append(Text(""))
        out.append(
            Text(
                f"… diffs of {len(with_diff) - max_files} more files left out (--all shows them)",
                style="bold yellow",
            )
        )
    return out


# --- the run --------------------------------------------------------------------------


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def termination_text(v: types.Validation) -> Text:
    """How the command's process ended, in words."""
    text = Text("Process: ", style="bold")
    if not v.sandboxed:
        text.append("not run (the verdict was reached without a dry run)", style="dim")
        return text
    t = v.termination
    if t is types.Termination.EXITED:
        text.append(f"exited with code {v.exit_code}", style="green" if v.exit_code == 0 else "red")
    elif t is types.Termination.SIGNALED:
        text.append(f"killed by signal {v.signal} ({_signal_name(v.signal)})", style="red")
    elif t is types.Termination.TIMED_OUT:
        text.append("timed out; its whole process tree was killed", style="red")
    elif t is types.Termination.OUT_OF_MEMORY:
        text.append("killed by the kernel: out of memory", style="red")
    elif t is types.Termination.CANCELLED:
        text.append("cancelled; its whole process tree was killed", style="yellow")
    else:  # pragma: no cover - every Termination is handled above
        text.append(t.name.lower())
    return text


def timings_text(t: types.Timings) -> Text:
    text = Text("Timings: ", style="bold")
    text.append(
        f"total {_ms(t.total_s)} · static {_ms(t.static_analysis_s)} · "
        f"sandbox {_ms(t.sandbox_s)} (setup {_ms(t.sandbox_setup_s)} + "
        f"command {_ms(t.command_s)}) · diff {_ms(t.diff_s)}"
    )
    return text


def _usage_text(u: types.ResourceUsage) -> Text:
    text = Text("Resources: ", style="bold")
    text.append(
        f"peak memory {human_size(u.peak_memory_bytes)} · cpu {_ms(u.cpu_time_s)} · "
        f"scratch {human_size(u.scratch_bytes_used)}"
    )
    if u.memory_limit_hit:
        text.append(" · memory limit hit", style="bold red")
    if u.pids_limit_hit:
        text.append(" · process limit hit", style="bold red")
    return text


def output_panel(
    name: str,
    data: bytes,
    *,
    truncated: bool,
    max_lines: int | None = None,
    max_bytes: int | None = None,
) -> Panel:
    """One output stream, decoded as UTF-8 with bad bytes replaced; with ``max_lines`` or
    ``max_bytes``, only its start, and a last line that says how much more there is."""
    title = f"{name} ({human_size(len(data))}"
    title += ", truncated)" if truncated else ")"
    whole = data.rstrip(b"\n")
    shown = whole if max_bytes is None else whole[:max_bytes]
    if max_lines is not None and shown.count(b"\n") >= max_lines:
        shown = b"\n".join(shown.split(b"\n", max_lines)[:max_lines])
    body = escape_controls(shown.decode("utf-8", errors="replace"), multiline=True)
    if len(shown) < len(whole):
        hidden = whole[len(shown) :]
        newlines = hidden.count(b"\n")
        more = f"{newlines} more line(s), " if newlines else ""
        body += f"\n… {more}{human_size(len(hidden))} not shown (--all shows everything)"
    return Panel(
        Text(body),
        title=Text(title, style="bold"),
        title_align="left",
        border_style="yellow" if truncated else "dim",
        expand=False,  # as wide as the output (piped, the console is very wide)
    )


_SKIP_REASONS = {
    types.DryRunSkip.STATIC_DENY: "not run: the static pass denied it",
    types.DryRunSkip.READ_ONLY: "not run: read-only command allowed by policy",
}


def static_text(v: types.Validation) -> Text:
    """One line: what the static pass saw, and whether the dry run happened."""
    s = v.static
    text = Text("Static: ", style="bold")
    if s.command_count:
        names = ", ".join(escape_controls(n) for n in s.command_names[:8])
        more = f" and {len(s.command_names) - 8} more" if len(s.command_names) > 8 else ""
        text.append(f"{s.command_count} command(s) ({names}{more}) · ")
        scope = s.scope.name.lower().replace("_", " ")
        text.append(f"{s.action.name.lower()} · {s.risk.name.lower()} · {scope}")
    if not v.sandboxed:
        reason = _SKIP_REASONS.get(v.dry_run_skip, "not run")
        text.append(f" · {reason}", style="yellow")
    if v.policy_version:
        text.append(f" · policy {escape_controls(v.policy_version[:12])}", style="dim")
    return text


def process_tree(processes: Sequence[types.ProcessInfo], truncated: bool) -> RenderableType:
    """The processes the command started, as a tree by parent."""
    title = f"Processes: {len(processes)}" + (" (more not shown)" if truncated else "")
    tree = Tree(Text(title, style="bold"))
    nodes: dict[int, Tree] = {}
    for p in processes:
        argv = " ".join(escape_controls(a.decode(errors="backslashreplace")) for a in p.argv)
        label = Text(f"[{p.pid if p.pid is not None else '?'}] ", style="dim")
        label.append(argv[:200] + ("…" if len(argv) > 200 else ""))
        if p.signal is not None:
            label.append(f"  killed by signal {p.signal}", style="red")
        elif p.exit_code not in (None, 0):
            label.append(f"  exit {p.exit_code}", style="yellow")
        if p.outlived_command:
            label.append("  outlived the command", style="yellow")
        if p.killed_by_timeout:
            label.append("  killed at the timeout", style="red")
        parent = nodes.get(p.ppid) if p.ppid is not None else None
        node = (parent or tree).add(label)
        if p.pid is not None:
            nodes[p.pid] = node
    return tree


_SHOWN_ATTEMPTS = 50


def _egress_cell(a: types.NetworkAttemptInfo) -> str:
    """What became of one attempt under an egress policy."""
    if a.forwarded:
        moved = f"↑{human_size(a.bytes_sent)} ↓{human_size(a.bytes_received)}"
        text = f"forwarded ({a.grant}) {moved}"
        return f"{text}, cut: {a.refusal}" if a.refusal else text
    if a.refusal and a.refusal != "no-grant":
        return f"refused: {a.refusal}"
    if a.grant:
        return f"granted ({a.grant})"
    return "blocked"


def network_table(attempts: Sequence[types.NetworkAttemptInfo], lost: int) -> RenderableType:
    """The network attempts of a dry run, one line each: forwarded under which grant (and the
    bytes each way), or refused and why."""
    forwarded = sum(1 for a in attempts if a.forwarded)
    if forwarded:
        title = f"Network attempts: {len(attempts)} ({forwarded} forwarded by egress grants)"
    else:
        title = f"Network attempts: {len(attempts)} (all blocked)"
    if lost:
        title += f", {lost} more not recorded"
    table = Table(title=title, title_justify="left", title_style="bold red", box=None)
    columns = ("t", "proto", "destination", "what", "egress")
    for column in columns if any(a.grant or a.forwarded for a in attempts) else columns[:4]:
        table.add_column(column, style="dim" if column == "t" else None)
    for a in attempts[:_SHOWN_ATTEMPTS]:
        if a.protocol is types.NetProtocol.DNS:
            dest = f"{a.address}:{a.port}"
            what = f"{a.dns_type or '?'} {a.dns_name}"
        else:
            name = f" ({a.dns_name})" if a.dns_name else ""
            dest = f"{a.address}:{a.port}{name}"
            if a.protocol is types.NetProtocol.UNIX:  # a host Unix socket: its path
                dest = a.address
            if a.http_method:
                what = f"{a.http_method} {a.http_host}{a.http_path}"
            elif a.sni:
                what = f"TLS to {a.sni}"
            else:
                what = f"{human_size(a.bytes_sent)} sent"
        row = [_ms(a.time_s), a.protocol.name, escape_controls(dest), escape_controls(what[:160])]
        if len(table.columns) == 5:
            row.append(escape_controls(_egress_cell(a)))
        table.add_row(*row)
    if len(attempts) > _SHOWN_ATTEMPTS:
        table.add_row("", "", f"… and {len(attempts) - _SHOWN_ATTEMPTS} more", "")
    return table


@dataclass(frozen=True)
class ReportBounds:
    """How much of a validation the human report shows (None: all of it)."""

    changes: int | None = 200  # paths listed in the change tree
    diff_files: int | None = 20  # files whose diff is shown
    diff_lines: int | None = 60  # lines of each diff
    output_lines: int | None = 60  # lines of each output stream
    output_bytes: int | None = 16 * 1024  # bytes of each output stream (a long line)
    summary_only: bool = False  # verdict, summary and findings only


ALL = ReportBounds(
    changes=None, diff_files=None, diff_lines=None, output_lines=None, output_bytes=None
)


def verdict_line(v: types.Validation) -> Text:
    """``Verdict: ALLOW  summary``: the report's first line, repeated next to a prompt."""
    head = Text("Verdict: ", style="bold")
    head.append_text(verdict_text(v.verdict))
    if v.summary:
        head.append("  ")
        head.append(escape_controls(v.summary))
    return head


def render_validation(v: types.Validation, bounds: ReportBounds = ALL) -> RenderableType:
    """The report of one validation: all of it, or within ``bounds``."""
    parts: list[RenderableType] = [verdict_line(v)]
    parts.append(
        Text(f"validation {escape_controls(v.validation_id)} · as uid {v.uid} gid {v.gid}", "dim")
    )
    parts.append(static_text(v))
    if v.findings:
        parts.append(Text("\nFindings", style="bold"))
        parts.append(findings_table(v.findings))
    if v.changes_not_kept and (v.changes or v.changes_truncated):
        note = Text("Not kept for apply: ", style="bold yellow")
        note.append(escape_controls(v.changes_not_kept.rstrip(".")))
        advice = not_kept_advice(v.changes_not_kept)
        note.append(f". `airlock apply` cannot write these changes; {advice}.")
        parts.append(note)
    if bounds.summary_only:
        return Group(*parts)
    parts.append(Text(""))
    if v.changes or v.changes_truncated:
        parts.append(change_tree(v.changes, truncated=v.changes_truncated, limit=bounds.changes))
        if bounds.diff_files != 0:
            parts.extend(diffs(v.changes, max_files=bounds.diff_files, max_lines=bounds.diff_lines))
    elif v.sandboxed:
        parts.append(Text("Changes: none", style="bold"))
    if v.processes:
        parts.append(process_tree(v.processes, v.processes_truncated))
    if v.sensitive_reads:
        head = Text("Sensitive reads", style="bold red")
        if v.sensitive_reads_incomplete:
            head.append(" (may be incomplete)", style="yellow")
        parts.append(head)
        for r in v.sensitive_reads:
            who = " ".join(a.decode(errors="backslashreplace") for a in r.argv[:4])
            line = Text("  ! ", style="red")
            line.append(escape_controls(r.path.decode(errors="backslashreplace")))
            line.append(f"  by [{r.pid or '?'}] {escape_controls(who)}", style="dim")
            parts.append(line)
    if v.network_attempts or v.network_attempts_lost:
        parts.append(network_table(v.network_attempts, v.network_attempts_lost))
    parts.append(Text(""))
    if v.sandboxed:
        parts.append(termination_text(v))
    parts.append(timings_text(v.timings))
    if v.sandboxed:
        parts.append(_usage_text(v.resource_usage))
        for name, data, truncated in (
            ("stdout", v.stdout, v.stdout_truncated),
            ("stderr", v.stderr, v.stderr_truncated),
        ):
            if data or truncated:
                parts.append(
                    output_panel(
                        name,
                        data,
                        truncated=truncated,
                        max_lines=bounds.output_lines,
                        max_bytes=bounds.output_bytes,
                    )
                )
    return Group(*parts)


def render_capabilities(c: types.Capabilities) -> RenderableType:
    """The host's and daemon's capabilities and limits as a two-column table."""

    def yes_no(flag: bool) -> Text:
        return Text("yes", style="green") if flag else Text("no", style="red")

    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    lim = c.limits
    rows: list[tuple[str, str | Text]] = [
        ("daemon version", c.daemon_version),
        ("kernel", c.kernel_release),
        ("namespaces", ", ".join(c.namespaces) or "none"),
        ("overlayfs", yes_no(c.overlayfs)),
        (
            "cgroups",
            f"{c.cgroup_version.name.lower()}: {', '.join(c.cgroup_controllers) or 'none'}"
            if c.cgroup_version is not types.CgroupVersion.NONE
            else Text("none (memory and process limits are not enforced)", style="yellow"),
        ),
        ("seccomp", yes_no(c.seccomp)),
        ("seccomp user notification", yes_no(c.seccomp_user_notification)),
        ("timeout", f"{lim.default_timeout_s:g} s (max {lim.max_timeout_s:g} s)"),
        ("memory", human_size(lim.memory_bytes)),
        ("processes", str(lim.pids)),
        ("scratch space", human_size(lim.scratch_bytes)),
        ("output kept", f"{human_size(lim.output_bytes)} per stream"),
        ("command size", human_size(lim.command_bytes)),
        ("concurrent validations", str(lim.concurrent_validations)),
        ("changes reported", str(lim.changes)),
    ]
    for key, value in rows:
        table.add_row(key, value if isinstance(value, Text) else Text(escape_controls(value)))
    return table


# --- the audit log ------------------------------------------------------------------


def _audit_time(time_ns: int) -> str:
    """Local time to the second (the log keeps nanoseconds since the epoch, UTC)."""
    return datetime.datetime.fromtimestamp(time_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _context(e: AuditEvent) -> str:
    """Who else the event names: the agent and its tool call, or the approver."""
    approver = e.approval.approver if e.approval is not None else None
    if approver is not None:
        return f"by uid {approver.uid} ({approver.basis.split(' ', 1)[0]}), asked by uid " + str(
            approver.asked_by_uid
        )
    a = e.agent
    if a is None:  # an Execute on an approval names it: "once approval ID ... by uid N"
        detail = e.approval.detail if e.approval is not None else ""
        return f"approved: {detail}" if " by uid " in detail else ""
    parts = [a.agent_name or "agent"]
    if a.tool_use_id:
        parts.append(a.tool_use_id)
    if a.tool_description:
        parts.append(f'"{a.tool_description}"')
    if a.session_id and a.session_id != e.session_id:
        parts.append(f"session {a.session_id}")
    return " ".join(parts)


def render_audit_events(events: Sequence[StoredEvent]) -> Table:
    """A compact table of audit events: one line each, long rules and commands cut."""
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    table.add_column("seq", justify="right", no_wrap=True)
    table.add_column("time", no_wrap=True)
    table.add_column("call", no_wrap=True)
    table.add_column("uid", justify="right", no_wrap=True)
    table.add_column("caller", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    # Only these three give up width when the terminal is narrow; their cells never wrap.
    table.add_column("context", max_width=40)
    table.add_column("rules", max_width=40)
    table.add_column("command", ratio=1, min_width=24)
    for stored in events:
        e = stored.event
        c = e.caller
        caller = f"{os.path.basename(c.exe) or '?'}[{c.pid}]"
        rules = ", ".join(dict.fromkeys(f.rule_id for f in e.findings))
        table.add_row(
            str(stored.seq),
            _audit_time(e.time_ns),
            e.kind.name.lower(),
            str(c.uid),
            Text(escape_controls(caller)),
            verdict_text(e.verdict) if e.verdict is not None else Text("-", style="dim"),
            Text(escape_controls(_context(e)), no_wrap=True, overflow="ellipsis"),
            Text(escape_controls(rules), no_wrap=True, overflow="ellipsis"),
            Text(escape_controls(_shorten(e.command, 80)), no_wrap=True, overflow="ellipsis"),
        )
    return table


def render_audit_verify(result: VerifyResult) -> Text:
    """The outcome of verifying the audit log, and the head to keep as an anchor."""
    head = f"{result.head.seq}:{result.head.hash}" if result.head else ""
    problem = result.problem
    if problem is None:
        text = Text("OK", style="bold green")
        text.append(f": {result.events} event{'s' if result.events != 1 else ''}, chain intact.")
        if head:
            text.append(f"\nhead {head}", style="dim")
            text.append("\n(keep it elsewhere; `airlock audit verify --anchor` it later)", "dim")
        return text
    text = Text("PROBLEM", style="bold red")
    text.append(f": {problem.kind.name} at event {problem.seq}: ")
    text.append(escape_controls(problem.detail))
    intact = f"{result.events} event{'s' if result.events != 1 else ''} before it intact"
    text.append(f"\n{intact}" + (f" (last intact {head})" if head else ""), style="dim")
    return text
