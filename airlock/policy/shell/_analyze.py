"""The entry point: walk the line, classify each command, freeze the model.

``analyze(command)`` parses the line with tree-sitter-bash and builds the command model
(:mod:`airlock.policy.model`): each simple command wherever it sits (pipelines, lists,
subshells, ``$( )``, backticks, process substitution, function/loop/branch bodies,
``bash -c`` strings, ``eval`` of literals, here-documents fed to a shell), with quotes
removed, flags split, redirects, wrappers unwrapped (data: ``data/wrappers.yaml``) and a
coarse classification (data: ``data/commands.yaml``).

Pure: no I/O except reading the two data files once, at import. Thread-safe (one
tree-sitter parser per thread). Never raises: anything it cannot analyse becomes a finding
(``parse.error``, ``parse.too-deep``, ``parse.too-large``, ``dynamic.*``,
``decode-to-shell``). The tree is walked with an explicit stack, never by recursion.
Bounded: one work budget per analysis (``max_work``, :mod:`._budget`) counts every node
visited and every character of model made, so that neither memory nor time can grow with
the square of the line (nested ``$( )`` repeat each level's text in every outer one).

Spans are byte offsets into the UTF-8 encoding of the original line; a command found
inside a re-parsed string (``bash -c '...'``, ``eval``, a here-document) carries the span
of the outermost word or here-document body it came from, and its own text.

Conventions of the model this package fills in:
- A bare assignment (``X=1``) or a lone redirect (``> f``) is a command whose argv0 is ""
  (rules can still match its assignments and redirects); ``normalized`` leaves it out.
- ``wrappers`` holds wrapper names (``sudo``, ``docker exec``, ``find -exec``) and, for
  strings run as command lines, ``NAME -c`` (``bash -c``, ``su -c``, ``env -S``), ``eval``,
  ``trap``, or the shell's name when it reads a here-document or a piped literal script.
  Wrappers whose words are run through a remote or sub shell (``ssh``, ``watch``) are
  joined and re-parsed like ``bash -c``.
- ``dynamic_args``: an argument contains an expansion, or brace expansion, or the wrapper
  adds arguments at run time (xargs, find -exec). Globs are kept as written (``/*``).
- Here-document bodies are in ``Redirect.body``; bodies fed to a shell are also parsed,
  those fed to an interpreter (python, perl, ...) are left to the rules' regexes.
- ``read_only`` holds when there is no finding, and every command is read-only per
  commands.yaml (with its flag/positional conditions), has no writing redirect except to
  ``null_targets``, only harmless leading assignments (LANG, LC_*, ...) and a literal name.
"""

from __future__ import annotations

from typing import Final

from airlock.policy.model import (
    ActionClass,
    Analysis,
    Classification,
    Redirect,
    RiskTier,
    Scope,
    SimpleCommand,
)
from airlock.policy.shell._budget import _OverBudget
from airlock.policy.shell._catalog import Catalog
from airlock.policy.shell._classify import _classify
from airlock.policy.shell._draft import (
    _RULES,
    PARSE_INTERNAL_ERROR,
    PARSE_TOO_LARGE,
    _Draft,
    _Limit,
)
from airlock.policy.shell._walker import _Walker
from airlock.policy.shell._words import _encode, _text
from airlock.types import Finding, FindingSource

# The work budget of one analysis (see analyze). The largest ordinary lines the daemon accepts
# (128 KiB: 60,000 arguments, a 10,000-command script in `bash -c` or a here-document) use at
# most 0.8 M units, a tenth of it; a nested shape that would make quadratic text (each level
# of `$( )` copies all inner ones) stops here, having made at most ~8 M characters of model.
MAX_WORK: Final = 8 << 20


def analyze(
    command: str,
    *,
    max_depth: int = 8,
    max_bytes: int = 1 << 20,
    max_commands: int = 10_000,
    max_parse_seconds: float = 1.0,
    max_work: int = MAX_WORK,
    catalog: Catalog | None = None,
) -> Analysis:
    """Parse a bash command line into the command model. Never raises.

    ``max_depth`` bounds re-parsing (``bash -c`` in ``bash -c`` ...), ``max_bytes`` the
    size of the line and of everything re-parsed from it, ``max_commands`` the number of
    simple commands extracted, ``max_work`` the work of the whole analysis (one unit per
    syntax node visited and per character of model made: words, command texts, the
    normalised line, here-document bodies, strings re-parsed); every tree-sitter parse (the
    line's, and those of the strings re-parsed from it) must end within
    ``max_parse_seconds`` of the start of the analysis. Exceeding one adds a
    ``parse.too-deep`` or ``parse.too-large`` finding and the analysis keeps what it found
    so far. ``catalog`` is the command catalog the words are read with (which options take a
    value, subcommands, classification): by default the built-in one; a policy bundle's is
    ``PolicyBundle.catalog`` (``PolicyBundle.analyze`` passes it).
    """
    if isinstance(command, bytes | bytearray):  # tolerated: typed str, but never raise
        command = bytes(command).decode("utf-8", "surrogateescape")
    elif not isinstance(command, str):
        command = str(command)
    if len(command) > max_bytes:
        return _too_large(command, len(command.encode("utf-8", "surrogatepass")), max_bytes)
    data = _encode(command)
    if len(data) > max_bytes:
        return _too_large(command, len(data), max_bytes)
    walker = _Walker(command, data, max_depth, max_bytes, max_commands, max_parse_seconds, max_work)
    if catalog is not None:  # a policy bundle's catalog (its `commands:` merged over ours)
        walker.catalog = catalog
    try:
        try:
            walker.run()
        except _Limit:
            walker.finding(
                PARSE_TOO_LARGE,
                f"The command line holds more than {max_commands} commands; the rest were "
                "not analysed.",
                (0, len(data)),
                "",
            )
        except _OverBudget:
            walker.finding(
                PARSE_TOO_LARGE,
                "The command line is too large or too deeply nested to analyse (its analysis "
                f"took more than {max_work} units of work); the rest was not analysed.",
                (0, len(data)),
                "",
            )
        return _result(walker)
    except (Exception, RecursionError) as exc:  # a bug: fail closed, never crash the daemon
        return _not_analysed(
            command,
            PARSE_INTERNAL_ERROR,
            f"The static analysis failed ({type(exc).__name__}); the command was not analysed.",
            len(data),
        )


def _too_large(command: str, size: int, limit: int) -> Analysis:
    return _not_analysed(
        command,
        PARSE_TOO_LARGE,
        f"The command is {size} bytes, more than the {limit}-byte limit for static "
        "analysis; it was not analysed.",
        size,
    )


def _not_analysed(command: str, rule: str, message: str, size: int) -> Analysis:
    """No command, and one finding on the whole line that says why."""
    verdict, severity = _RULES[rule]
    finding = Finding(
        rule_id=rule,
        verdict=verdict,
        severity=severity,
        message=message,
        source=FindingSource.STATIC,
        span=(0, size),
    )
    return Analysis(
        source=command,
        commands=(),
        pipelines=(),
        findings=(finding,),
        classification=Classification(),
        read_only=False,
        normalized="",
    )


def _result(draft: _Draft) -> Analysis:
    """The frozen model of what the walk found, each command classified."""
    index = {id(c): i for i, c in enumerate(draft.commands)}
    pipelines: list[tuple[int, ...]] = []
    pipe_index: dict[int, int] = {}
    for pid, members in enumerate(draft.pipes):
        if len(members) < 2:
            continue
        ordered = sorted(members, key=lambda c: (c.pos, index[id(c)]))
        pipe_index[pid] = len(pipelines)
        pipelines.append(tuple(index[id(c)] for c in ordered))
    commands: list[SimpleCommand] = []
    lines: list[str] = []
    read_only = not any(f.rule_id != PARSE_INTERNAL_ERROR for f in draft.findings)
    action, risk, scope = ActionClass.READ, RiskTier.SAFE, Scope.WORKSPACE
    for cmd in draft.commands:
        span = draft.real_span(cmd.job, cmd.nspan)
        classification, cmd_read_only = _classify(cmd, draft.catalog)
        read_only = read_only and cmd_read_only
        action = max(action, classification.action)
        risk = max(risk, classification.risk)
        scope = max(scope, classification.scope)
        commands.append(
            SimpleCommand(
                argv0=cmd.argv0,
                name=cmd.name,
                args=tuple(cmd.args),
                flags=cmd.flags,
                positionals=cmd.positionals,
                option_values=cmd.option_values,
                redirects=tuple(
                    Redirect(op=r.op, fd=r.fd, target=r.target, dynamic=r.dynamic, body=r.body)
                    for r in cmd.redirects
                ),
                assignments=tuple(cmd.assignments),
                wrappers=cmd.wrappers,
                text=_text(cmd.job.data, cmd.nspan[0], cmd.nspan[1]),
                span=span,
                depth=cmd.depth,
                dynamic=cmd.dynamic,
                dynamic_args=cmd.dynamic_args,
                background=cmd.background,
                pipeline=pipe_index.get(cmd.pid, -1),
                pipeline_position=cmd.pos if cmd.pid in pipe_index else 0,
                classification=classification,
            )
        )
        if not cmd.is_wrapper and cmd.words:
            lines.append(" ".join(w.value for w in cmd.words))
    return Analysis(
        source=draft.source,
        commands=tuple(commands),
        pipelines=tuple(pipelines),
        findings=tuple(draft.findings),
        classification=Classification(action, risk, scope),
        read_only=read_only,
        normalized="\n".join(lines),
    )
