"""The analysis under construction: simple commands, redirects, jobs and findings.

:class:`_Draft` holds what a walk has found so far (the commands, the pipelines, the
findings, the strings still to parse); the walker (:mod:`._walker`) and the unwrapper
(:mod:`._unwrap`) add to it, and :mod:`._analyze` turns it into the frozen model
(:mod:`airlock.policy.model`). Also here: the ids of the parser's own findings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from airlock.policy.shell._budget import _Budget
from airlock.policy.shell._catalog import BUILTIN, Catalog, _Spec
from airlock.policy.shell._words import _encode, _text, _Word
from airlock.types import Finding, FindingSource, Severity, Verdict

PARSE_ERROR: Final = "parse.error"
PARSE_TOO_DEEP: Final = "parse.too-deep"
PARSE_TOO_LARGE: Final = "parse.too-large"
PARSE_INTERNAL_ERROR: Final = "parse.internal-error"
DYNAMIC_COMMAND_NAME: Final = "dynamic.command-name"
DYNAMIC_EVAL: Final = "dynamic.eval"
DYNAMIC_SHELL_STRING: Final = "dynamic.shell-string"
DECODE_TO_SHELL: Final = "decode-to-shell"

_RULES: Final[dict[str, tuple[Verdict, Severity]]] = {
    PARSE_ERROR: (Verdict.ASK, Severity.MEDIUM),
    PARSE_TOO_DEEP: (Verdict.ASK, Severity.MEDIUM),
    PARSE_TOO_LARGE: (Verdict.ASK, Severity.MEDIUM),
    PARSE_INTERNAL_ERROR: (Verdict.ASK, Severity.HIGH),
    DYNAMIC_COMMAND_NAME: (Verdict.ASK, Severity.MEDIUM),
    DYNAMIC_EVAL: (Verdict.ASK, Severity.HIGH),
    DYNAMIC_SHELL_STRING: (Verdict.ASK, Severity.HIGH),
    DECODE_TO_SHELL: (Verdict.DENY, Severity.CRITICAL),
}
# At most this many findings per rule id: the verdict is the same, the list stays readable.
_MAX_FINDINGS_PER_RULE: Final = 16
_WRITE_OPS: Final = frozenset({">", ">>", ">|", "&>", "&>>", "<>"})


@dataclass(slots=True)
class _Redir:
    op: str
    fd: int | None
    target: str
    dynamic: bool
    word: _Word | None = None
    body: str = ""
    body_dynamic: bool = False
    body_span: tuple[int, int] = (0, 0)
    heredoc: bool = False

    @property
    def writes(self) -> bool:
        return self.op in _WRITE_OPS


@dataclass(slots=True)
class _Job:
    """One string to parse: the line itself, or a string found in it (bash -c, eval, ...)."""

    data: bytes
    outer_span: tuple[int, int] | None
    depth: int
    wrappers: tuple[str, ...]
    background: bool


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A command's own arguments read with its catalog entry, subcommands followed."""

    spec: _Spec  # the deepest entry that matched (the command's, without a subcommand)
    matched: bool  # a subcommand matched
    flags: tuple[str, ...]  # all of them (global options included)
    positionals: tuple[str, ...]  # the subcommand words included, option values excluded
    option_values: tuple[tuple[str, str], ...]
    global_flags: tuple[str, ...]  # flags before the (first) subcommand word
    sub_flags: tuple[str, ...]  # after the last subcommand word (all when none matched)
    sub_positionals: tuple[str, ...]
    sub_args: tuple[str, ...]


@dataclass
class _Cmd:
    """A simple command under construction (becomes a model.SimpleCommand)."""

    words: list[_Word]
    assignments: list[tuple[str, str]]
    redirects: list[_Redir]
    wrappers: tuple[str, ...]
    job: _Job
    nspan: tuple[int, int]  # span in the job's data
    pid: int
    pos: int
    background: bool
    depth: int
    own_end: int = -1  # words[1:own_end] are this command's own arguments (wrappers)
    excluded: tuple[tuple[int, int], ...] = ()  # word ranges run by find -exec
    is_wrapper: bool = False
    dynamic_args_extra: bool = False
    reads_stdin: bool = False
    flags: tuple[str, ...] = ()
    positionals: tuple[str, ...] = ()
    option_values: tuple[tuple[str, str], ...] = ()  # (flag, value), set by finish()
    parsed: _Parsed | None = None  # its arguments read with the catalog, set by finish()
    own: list[str] | None = None  # own_args(), once computed
    dynamic_args: bool = False  # set by finish()
    argv0: str = field(init=False)
    name: str = field(init=False)  # basename of argv0, unless that part is dynamic
    dynamic: bool = field(init=False)  # argv0 is not a literal

    def __post_init__(self) -> None:
        if not self.words:
            self.argv0 = self.name = ""
            self.dynamic = False
            return
        w = self.words[0]
        self.argv0 = self.name = w.value
        self.dynamic = w.dynamic or w.procsub or w.glob or w.brace
        slash = w.value.rfind("/")
        if 0 <= slash < len(w.value) - 1 and not w.expands_after(slash):
            self.name = w.value[slash + 1 :]

    @property
    def args(self) -> list[str]:
        return [w.value for w in self.words[1:]]

    def own_args(self) -> list[str]:
        """Its own arguments: not the command a wrapper runs, nor find's -exec commands.

        Cached: call it only once own_end and excluded are final (in finish())."""
        if self.own is not None:
            return self.own
        end = len(self.words) if self.own_end < 0 else self.own_end
        if not self.excluded:
            self.own = [w.value for w in self.words[1:end]]
        else:
            skip = {i for a, b in self.excluded for i in range(a, b)}
            self.own = [self.words[i].value for i in range(1, end) if i not in skip]
        return self.own


def _split_flags(
    args: Sequence[str], style: str, with_value: frozenset[str]
) -> tuple[list[str], list[str]]:
    """Flags (clusters split, long ones without =value) and positionals; none after --."""
    flags, positionals, _values = _split_options(args, style, with_value)
    return flags, positionals


def _takes_next(arg: str, style: str, with_value: frozenset[str]) -> bool:
    """Whether the option word ``arg`` takes the next word as its value."""
    if arg.startswith("--") or style == "single_dash":
        return arg in with_value  # "--opt=value" carries its value
    if arg[1:].isdigit():
        return False
    for i in range(1, len(arg)):
        if "-" + arg[i] in with_value:
            return i == len(arg) - 1  # the value is attached unless the option ends the word
    return False


def _split_options(
    args: Sequence[str],
    style: str,
    with_value: frozenset[str],
    posix: bool = False,
    optional: frozenset[str] = frozenset(),
) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Flags (clusters split, long ones without =value), positionals (none after --, no
    option value) and option values: (flag, value) for ``--opt=value``, an attached short
    value (``-n5``) and an option of ``with_value`` followed by its value (``-d DATA``,
    ``--data DATA``; for ``bundled_first_arg``, ``tar czf FILE``: the next words in order).
    ``posix``: options end at the first positional (``python script.py -c x``: -c is the
    script's). ``optional``: short options whose value is optional, so only attached
    (``mysql -pSECRET``, ``sed -i.bak``): the rest of the word, never the next one."""
    flags: list[str] = []
    positionals: list[str] = []
    values: list[tuple[str, str]] = []
    pending: list[str] = []  # options waiting for their value (the next words)
    ended = False
    for index, arg in enumerate(args):
        if pending:
            values.append((pending.pop(0), arg))
            continue
        if ended:
            positionals.append(arg)
            continue
        if arg == "--":
            ended = True
            continue
        if len(arg) < 2 or arg[0] != "-":
            if style == "bundled_first_arg" and index == 0 and arg.isalpha():
                for c in arg:
                    flags.append("-" + c)
                    if "-" + c in with_value:
                        pending.append("-" + c)
                continue
            positionals.append(arg)
            ended = posix
            continue
        if arg.startswith("--") or style == "single_dash":
            name, eq, value = arg.partition("=")
            flags.append(name)
            if eq:
                values.append((name, value))
            elif name in with_value:
                pending.append(name)
        elif arg[1:].isdigit():
            flags.append(arg)
        else:
            for i in range(1, len(arg)):
                flag = "-" + arg[i]
                flags.append(flag)
                if flag in with_value or flag in optional:
                    if i + 1 < len(arg):
                        values.append((flag, arg[i + 1 :]))  # the rest of the word
                    elif flag in with_value:
                        pending.append(flag)
                    break
    return flags, positionals, values


class _Limit(Exception):
    """Raised to stop extracting when max_commands is reached."""


class _Draft:
    """The analysis so far: its limits, the commands, pipelines and findings found, and
    the jobs (strings to parse) still to walk."""

    def __init__(
        self,
        source: str,
        data: bytes,
        max_depth: int,
        max_bytes: int,
        max_commands: int,
        max_parse_seconds: float,
        max_work: int,
    ):
        self.source = source
        self.budget = _Budget(max_work)
        self.max_parse_seconds = max_parse_seconds
        self.deadline = time.monotonic() + max_parse_seconds
        self.data = data
        self.max_depth = max_depth
        self.max_bytes = max_bytes
        self.max_commands = max_commands
        self.commands: list[_Cmd] = []
        self.findings: list[Finding] = []
        self.finding_counts: dict[str, int] = {}
        self.pipes: list[list[_Cmd]] = []
        self.jobs: list[_Job] = []
        self.bytes_parsed = 0
        self.decode_checks: list[tuple[_Cmd, _Word, str]] = []
        self.catalog: Catalog = BUILTIN  # the analysis's command catalog (analyze sets it)

    # -- findings --------------------------------------------------------------------------

    def finding(self, rule: str, message: str, span: tuple[int, int], subcommand: str) -> None:
        count = self.finding_counts.get(rule, 0)
        if count >= _MAX_FINDINGS_PER_RULE:
            return
        self.finding_counts[rule] = count + 1
        verdict, severity = _RULES[rule]
        self.findings.append(
            Finding(
                rule_id=rule,
                verdict=verdict,
                severity=severity,
                message=message,
                source=FindingSource.STATIC,
                subcommand=subcommand,
                span=span,
            )
        )

    def finding_at(self, rule: str, message: str, job: _Job, span: tuple[int, int]) -> None:
        """A finding on ``span`` of ``job``'s text, reported where it is in the line."""
        real = self.real_span(job, span)
        self.finding(rule, message, real, self.real_text(real))

    def real_span(self, job: _Job, span: tuple[int, int]) -> tuple[int, int]:
        """Where ``span`` of ``job`` is in the line: a nested job's outermost word or body."""
        return job.outer_span if job.outer_span is not None else span

    def real_text(self, span: tuple[int, int]) -> str:
        # Never raises: a finding is not lost to the budget (there are at most
        # _MAX_FINDINGS_PER_RULE of each); the next charge stops the analysis.
        self.budget.left -= span[1] - span[0]
        return _text(self.data, span[0], span[1])

    # -- jobs ------------------------------------------------------------------------------

    def queue(self, cmd: _Cmd, text: str, span: tuple[int, int], label: str, what: str) -> None:
        """Parse ``text`` (a string the command runs as a command line) as its own job."""
        self.queue_job(cmd.job, text, span, (*cmd.wrappers, label), cmd.background, what)

    def queue_job(
        self,
        job: _Job,
        text: str,
        span: tuple[int, int],
        wrappers: tuple[str, ...],
        background: bool,
        what: str,
    ) -> None:
        if job.depth + 1 > self.max_depth:
            self.finding_at(
                PARSE_TOO_DEEP,
                f"Command lines are nested more than {self.max_depth} levels deep "
                f"({what} inside {what}...); the innermost ones were not analysed.",
                job,
                span,
            )
            return
        self.budget.charge(len(text))
        data = _encode(text)
        if self.bytes_parsed + len(data) > self.max_bytes:
            self.finding_at(
                PARSE_TOO_LARGE,
                f"The command lines nested in this one add up to more than {self.max_bytes} "
                "bytes; the rest were not analysed.",
                job,
                span,
            )
            return
        self.jobs.append(_Job(data, self.real_span(job, span), job.depth + 1, wrappers, background))

    # -- commands --------------------------------------------------------------------------

    def add(self, cmd: _Cmd) -> None:
        if len(self.commands) >= self.max_commands:
            raise _Limit
        # What the model will make of it: its text, its line in the normalised line, its
        # redirects (inherited ones are copied into every command).
        self.budget.charge(
            cmd.nspan[1]
            - cmd.nspan[0]
            + sum(len(w.value) + 1 for w in cmd.words)
            + len(cmd.redirects)
            + len(cmd.assignments)
        )
        self.commands.append(cmd)
        if cmd.pid >= 0:
            self.pipes[cmd.pid].append(cmd)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return f"`{text}`" if len(text) <= limit else f"`{text[: limit - 3]}...`"
