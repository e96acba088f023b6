"""A short, deterministic, human summary of a dry run. Pure code: no I/O.

Example: "Exited with code 0. In the workspace: created 1 file (notes.txt);
deleted 1 file (old.log). Nothing changed outside the workspace."
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from airlock.egress import HOST_SERVICE, suggestion
from airlock.policy.worklost import summary_sentence
from airlock.types import (
    ChangeKind,
    FileChange,
    FileType,
    Finding,
    LostWork,
    NetProtocol,
    NetworkAttemptInfo,
    ProcessInfo,
    SensitiveReadInfo,
    Termination,
    Verdict,
)

__all__ = ["denied_summary", "policy_sentence", "read_only_summary", "summarize"]

_LISTED = 3
_VERBS = {
    ChangeKind.CREATED: "created",
    ChangeKind.MODIFIED: "modified",
    ChangeKind.DELETED: "deleted",
    ChangeKind.METADATA_CHANGED: "changed the mode or owner of",
}
_NOUNS = {
    FileType.REGULAR: ("file", "files"),
    FileType.DIRECTORY: ("directory", "directories"),
    FileType.SYMLINK: ("symlink", "symlinks"),
    FileType.OTHER: ("special file", "special files"),
    FileType.NONE: ("entry", "entries"),
}


def _count(n: int, file_type: FileType) -> str:
    singular, plural = _NOUNS[file_type]
    return f"{n} {singular if n == 1 else plural}"


def _display(change: FileChange, workspace: str) -> str:
    path = change.path.decode(errors="backslashreplace")
    if change.in_workspace and workspace:
        rel = os.path.relpath(path, workspace)
        return "." if rel == "." else rel
    return path


def _describe(changes: Sequence[FileChange], workspace: str) -> str:
    parts: list[str] = []
    for kind in ChangeKind:
        of_kind = [c for c in changes if c.kind is kind]
        for file_type in FileType:
            group = [c for c in of_kind if c.file_type is file_type]
            if not group:
                continue
            names = ", ".join(_display(c, workspace) for c in group[:_LISTED])
            if len(group) > _LISTED:
                names += f" and {len(group) - _LISTED} more"
            parts.append(f"{_VERBS[kind]} {_count(len(group), file_type)} ({names})")
    return "; ".join(parts)


def _ending(termination: Termination, exit_code: int, signal: int, timeout_s: float) -> str:
    if termination is Termination.EXITED:
        return f"Exited with code {exit_code}."
    if termination is Termination.TIMED_OUT:
        return f"Timed out after {timeout_s:g} s; its whole process tree was killed."
    if termination is Termination.OUT_OF_MEMORY:
        return "Was killed by the kernel for exceeding the sandbox's memory limit."
    if termination is Termination.CANCELLED:
        return "Was cancelled by the caller; its whole process tree was killed."
    return f"Was killed by signal {signal}."


def _programs(processes: Sequence[ProcessInfo]) -> str:
    """ "Ran 3 programs (make, cc, ld)." from the processes, the command's own shell left out."""
    names: dict[str, None] = {}
    for index, proc in enumerate(processes):
        for position, exe in enumerate(proc.executables or proc.argv[:1]):
            name = os.path.basename(exe).decode(errors="backslashreplace")
            if index == 0 and position == 0 and name in ("bash", "sh"):
                continue  # the `bash -c` that runs the command line (it may exec the last command)
            names.setdefault(name, None)
    if not names:
        return ""
    shown = list(names)[: _LISTED * 2]
    more = len(names) - len(shown)
    listed = ", ".join(shown) + (f" and {more} more" if more > 0 else "")
    count = len(names)
    return f" Ran {count} program{'s' if count != 1 else ''} ({listed})."


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


def _listed(items: Sequence[str]) -> str:
    more = f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return ", ".join(items[:_LISTED]) + more


def _where(a: NetworkAttemptInfo) -> str:
    if a.protocol is NetProtocol.UNIX:  # a host Unix socket: its path
        return a.address
    host = a.dns_name or a.host
    return f"[{host}]:{a.port}" if ":" in host else f"{host}:{a.port}"


_REFUSED = {
    "denied": "an egress deny entry",
    "address": "the name resolves to a loopback, private, link-local or host address",
    "resolve": "the name did not resolve",
    "connect": "the destination did not answer",
    "name-mismatch": "the TLS server name or HTTP Host was not the name looked up",
    "not-fetch": "not a fetch: a dry run forwards only HTTP GET/HEAD and TLS",
    "upload-cap": "cut: it sent more than a dry run lets a connection send",
    "sensitive-read": "after a sensitive read nothing is forwarded",
    "udp": "UDP is never forwarded",
    "limit": "too many connections at once, or forwarded connections or names in one run",
    HOST_SERVICE: "a service on this machine: refused in the sandbox; on the host something"
    " may listen",
}

# Execute forwards any TLS or HTTP: only a stream it cannot check the name of is refused.
_REFUSED_EXECUTE = {"not-fetch": "neither TLS nor HTTP, whose server name could be checked"}


def _egress(attempts: Sequence[NetworkAttemptInfo], *, mode: str = "dry_run") -> list[str]:
    """Under an egress policy: what was downloaded from where (Execute: sent and received),
    what was refused and why, with the ``egress.MODE.allow`` line that would allow it."""
    sentences: list[str] = []
    fetched: dict[str, list[NetworkAttemptInfo]] = {}
    for a in attempts:
        if a.forwarded:
            fetched.setdefault(a.dns_name or a.host, []).append(a)
    for host, conns in list(fetched.items())[:_LISTED]:
        size = _size(sum(a.bytes_received for a in conns))
        grants = ", ".join(dict.fromkeys(a.grant for a in conns))
        n = len(conns)
        over = f"over {n} connection{'s' if n != 1 else ''} (egress grant {grants})"
        if mode == "execute":
            sent = _size(sum(a.bytes_sent for a in conns))
            sentences.append(f"Sent {sent} to and received {size} from {host} {over}.")
        else:
            sentences.append(f"Downloaded {size} from {host} {over}.")
    if len(fetched) > _LISTED:
        sentences.append(f"Reached {len(fetched) - _LISTED} more host(s).")
    refused: dict[str, dict[str, NetworkAttemptInfo]] = {}
    for a in attempts:
        if a.protocol is not NetProtocol.DNS and a.refusal:
            refused.setdefault(a.refusal, {}).setdefault(_where(a), a)
    for code, by_place in refused.items():
        places = list(by_place)
        if code == "no-grant":
            first = next(iter(by_place.values()))
            line = suggestion(first.dns_name, first.address, first.port)
            sentences.append(
                f"Refused {_listed(places)} (no egress grant; `{line}` under "
                f"egress.{mode}.allow would allow {places[0]})."
            )
        elif code == "address":
            first = next(iter(by_place.values()))
            detail = f": {first.refusal_detail}" if first.refusal_detail else ""
            sentences.append(
                f"Refused {_listed(places)} ({_REFUSED[code]}{detail}; only an allow entry's "
                "cidrs can grant such an address)."
            )
        else:
            why = (_REFUSED_EXECUTE if mode == "execute" else _REFUSED).get(code)
            sentences.append(f"Refused {_listed(places)} ({why or _REFUSED.get(code, code)}).")
    return sentences


def _network(
    attempts: Sequence[NetworkAttemptInfo], lost: int, *, egress: bool = False
) -> list[str]:
    """ "Tried to reach pypi.org:443 (blocked during the dry run)." and the lone DNS lookups;
    under an egress policy, what was downloaded and what was refused instead. Attempts to
    reach a service on this machine (refused on the sandbox's loopback) have a sentence of
    their own: on the host, that request would have reached whatever listens there."""
    local = list(
        dict.fromkeys(
            _where(a) + ("/udp" if a.protocol is NetProtocol.UDP else "")
            for a in attempts
            if a.refusal == HOST_SERVICE
        )
    )
    attempts = [a for a in attempts if a.refusal != HOST_SERVICE]
    reached: dict[str, None] = {}
    for a in attempts:
        if a.protocol is not NetProtocol.DNS and not egress:
            host = a.host
            reached.setdefault(f"[{host}]:{a.port}" if ":" in host else f"{host}:{a.port}", None)
    connected = {a.dns_name for a in attempts if a.protocol is not NetProtocol.DNS}
    looked_up = list(
        dict.fromkeys(
            a.dns_name or "?"
            for a in attempts
            if a.protocol is NetProtocol.DNS and a.dns_name not in connected
        )
    )
    sentences: list[str] = _egress(attempts) if egress else []
    if local:
        sentences.append(
            f"Tried to reach a service on this machine: {_listed(local)} (refused in the "
            "sandbox; on the host something may listen)."
        )
    for items, template in (
        (list(reached), "Tried to reach {} (blocked during the dry run)."),
        (looked_up, "Looked up {} (answered with a placeholder address)."),
    ):
        if items:
            more = f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
            sentences.append(template.format(", ".join(items[:_LISTED]) + more))
    if lost:
        sentences.append(f"{lost} more network attempt(s) were not recorded.")
    return sentences


def execute_network_summary(attempts: Sequence[NetworkAttemptInfo], lost: int) -> str:
    """What an Execute's network attempts came to: reached under which grant, refused why."""
    sentences = _egress(attempts, mode="execute")
    if lost:
        sentences.append(f"{lost} more network attempt(s) were not recorded.")
    return " ".join(sentences)


def summarize(
    *,
    changes: Sequence[FileChange],
    changes_truncated: bool,
    termination: Termination,
    exit_code: int,
    signal: int,
    timeout_s: float,
    workspace: str,
    processes: Sequence[ProcessInfo] = (),
    sensitive_reads: Sequence[SensitiveReadInfo] = (),
    network: Sequence[NetworkAttemptInfo] = (),
    network_lost: int = 0,
    egress: bool = False,
    work_lost: Sequence[LostWork] = (),
) -> str:
    sentences = [_ending(termination, exit_code, signal, timeout_s) + _programs(processes)]
    inside = [c for c in changes if c.in_workspace]
    outside = [c for c in changes if not c.in_workspace]
    if not changes:
        sentences.append("Changed no files.")
    else:
        if inside:
            sentences.append(f"In the workspace: {_describe(inside, workspace)}.")
        if outside:
            sentences.append(f"Outside the workspace: {_describe(outside, workspace)}.")
        else:
            sentences.append("Nothing changed outside the workspace.")
    if changes_truncated:
        sentences.append(f"Only the first {len(changes)} changes are listed.")
    unreadable = sum(1 for c in changes if c.unreadable)
    if unreadable:
        sentences.append(
            f"{unreadable} changed file(s) hold content you may not read: not shown, not kept."
        )
    if sensitive_reads:
        paths = list(
            dict.fromkeys(r.path.decode(errors="backslashreplace") for r in sensitive_reads)
        )
        more = f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else ""
        sentences.append(f"Read {', '.join(paths[:_LISTED])}{more}.")
    lost = summary_sentence(work_lost, workspace)
    if lost:
        sentences.append(lost)
    sentences += _network(network, network_lost, egress=egress)
    return " ".join(sentences)


_DECISION_WORDS = {Verdict.ASK: "asks", Verdict.DENY: "denies"}


def _quote(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def policy_sentence(verdict: Verdict, findings: Sequence[Finding]) -> str:
    """ " Policy asks: <title> (<rule>)." for the strictest finding; "" when allowed."""
    if verdict is Verdict.ALLOW or not findings:
        return ""
    top = findings[0]
    where = f" in `{_quote(top.subcommand)}`" if top.subcommand else ""
    more = f" (+{len(findings) - 1} more finding(s))" if len(findings) > 1 else ""
    word = _DECISION_WORDS.get(verdict, "asks")
    return f" Policy {word}: {top.message} ({top.rule_id}){where}{more}."


def denied_summary(findings: Sequence[Finding]) -> str:
    """The summary of a command the static pass denied, so it was not run."""
    return "Not run: the static pass denies it." + policy_sentence(Verdict.DENY, findings)


def read_only_summary(names: Sequence[str]) -> str:
    shown = ", ".join(dict.fromkeys(names[: _LISTED * 2]))
    return f"Not run: read-only command(s) ({shown}) that the policy allows; no dry run needed."
