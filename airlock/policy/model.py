"""The command model: what a bash command line would run, as bash would see it.

Built by :mod:`airlock.policy.shell` from the tree-sitter-bash parse tree; read by
the rule engine (:mod:`airlock.policy.rules`). Pure data: frozen dataclasses.

Every *simple command* that can run appears in :attr:`Analysis.commands`, wherever
it sits (pipelines, lists, subshells, ``$( )``, backticks, process substitution,
function, loop and branch bodies, strings passed to ``bash -c``/``eval``, bodies of
here-documents fed to a shell). Wrappers (``sudo``, ``env``, ``timeout``, ``xargs``,
``find -exec``, ...) are unwrapped: the inner command is its own
:class:`SimpleCommand` whose :attr:`SimpleCommand.wrappers` names the chain.
"""

from __future__ import annotations

from dataclasses import dataclass

from airlock.types import ActionClass, Finding, RiskTier, Scope

__all__ = [
    "ActionClass",
    "Analysis",
    "Classification",
    "Redirect",
    "RiskTier",
    "Scope",
    "SimpleCommand",
]


@dataclass(frozen=True)
class Classification:
    """The four axes. For a whole line: the maximum of each axis over its commands."""

    action: ActionClass = ActionClass.READ
    risk: RiskTier = RiskTier.SAFE
    scope: Scope = Scope.WORKSPACE


@dataclass(frozen=True)
class Redirect:
    """One redirection, e.g. ``2>>log`` is ``Redirect(op=">>", fd=2, target="log")``."""

    op: str  # ">", ">>", ">|", "&>", "&>>", "<", "<<", "<<<", "<>", ">&", "<&"
    fd: int | None  # the explicit file descriptor, if written (2 in 2>); None otherwise
    target: str  # quote-removed target word ("" for here-documents)
    dynamic: bool = False  # the target contains an expansion we cannot resolve statically
    body: str = ""  # here-documents: the text fed to the command (after <<- tab stripping)

    @property
    def writes(self) -> bool:
        """Whether this redirect writes to (or truncates/creates) its target."""
        return self.op in (">", ">>", ">|", "&>", "&>>", "<>")


@dataclass(frozen=True)
class SimpleCommand:
    """One command that can run, with its words after quote removal."""

    argv0: str  # as bash would look it up, quote-removed: "\\rm", "r''m", "$'\\x72m'" are all "rm"
    name: str  # basename of argv0: what rules match on ("/usr/bin/rm" -> "rm")
    args: tuple[str, ...]  # every word after argv0, quote-removed, in order
    flags: tuple[str, ...]  # option flags: clusters split ("-rf" -> "-r", "-f"); long as written
    # without "=value" ("--data=@x" -> "--data"); none after "--"
    positionals: tuple[str, ...]  # the non-flag arguments; option values excluded ("--opt=v",
    # "-n5", and the word after an option the command catalog says takes one: "curl -d DATA")
    redirects: tuple[Redirect, ...]
    assignments: tuple[tuple[str, str], ...]  # leading NAME=value pairs (quote-removed values)
    wrappers: tuple[str, ...]  # enclosing wrappers, outermost first: ("sudo", "bash -c")
    text: str  # this command's source text (for nested strings: the inner text)
    span: tuple[int, int]  # byte span in the ORIGINAL command line (for commands inside a
    # nested string: the span of the outermost enclosing word in the original line)
    depth: int = 0  # nesting depth of re-parsing (bash -c / eval / heredoc-to-shell)
    dynamic: bool = False  # argv0 is not a literal (built from $var, $( ), globs, braces)
    dynamic_args: bool = False  # some argument is not a literal (contains an expansion)
    background: bool = False  # run with & (or coproc)
    pipeline: int = -1  # index of the pipeline it belongs to in Analysis.pipelines, or -1
    pipeline_position: int = 0  # 0-based position within that pipeline
    classification: Classification = Classification()
    # Option values, in order: (flag, value) for "--opt=value", "-n5", and the options the
    # command catalog (or the policy bundle's `commands:`) says take the next word: "-d DATA".
    option_values: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Analysis:
    """The whole command line: its commands, pipelines, findings and classification."""

    source: str
    commands: tuple[SimpleCommand, ...]
    # Each pipeline of two or more commands, as indices into ``commands``, left to right.
    pipelines: tuple[tuple[int, ...], ...]
    # Findings of the parser itself: parse.error, parse.too-deep, parse.too-large and
    # dynamic-part findings (dynamic.command-name, dynamic.eval, decode-to-shell, ...).
    findings: tuple[Finding, ...]
    classification: Classification
    # True when every command is a known read-only command with no writing redirect and
    # nothing dynamic: eligible for the read-only fast path (if the policy allows it).
    read_only: bool
    # The normalized ("de-obfuscated") text: each command's argv joined by spaces, one
    # command per line, wrappers removed. Rules' deobfuscated regexes run on it.
    normalized: str
