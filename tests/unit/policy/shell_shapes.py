"""The worst command lines for the static analysis, each as large as the daemon accepts.

Shared by tests/unit/policy/test_shell_limits.py (memory bound, verdict) and
bench/parse_worst.py (peak RSS and time). Each shape is the longest line of its kind that
fits ``size`` bytes (131,072 by default: the daemon's command limit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

COMMAND_LIMIT: Final = 128 * 1024


def _nest(prefix: str, open_: str, inner: str, close: str, size: int) -> str:
    n = max(1, (size - len(prefix) - len(inner)) // (len(open_) + len(close)))
    return prefix + open_ * n + inner + close * n


def _repeat(head: str, unit: str, tail: str, size: int) -> str:
    n = max(1, (size - len(head) - len(tail)) // len(unit))
    return head + unit * n + tail


def nested_cmdsub(size: int = COMMAND_LIMIT) -> str:
    """``echo $(echo $(echo ... x))``: every level is a command whose word is the rest."""
    return _nest("", "echo $(", "x", ")", size)


def nested_cmdsub_quoted(size: int = COMMAND_LIMIT) -> str:
    """``echo "$(echo "$( ... )")"``: the same inside double quotes."""
    return _nest("", 'echo "$(', "x", ')"', size)


def nested_param(size: int = COMMAND_LIMIT) -> str:
    """``echo ${a:-${a:-...}}``: one word, nested parameter expansions."""
    return _nest("echo ", "${a:-", "x", "}", size)


def nested_param_cmdsub(size: int = COMMAND_LIMIT) -> str:
    """``${a:-$(echo ${a:-$(...)})}``: parameter expansions and substitutions interleaved."""
    return _nest("echo ", "${a:-$(echo ", "x", ")}", size)


def nested_procsub(size: int = COMMAND_LIMIT) -> str:
    """``cat <(cat <(...))``: process substitutions (kind P words)."""
    return _nest("", "cat <(", "x", ")", size)


def nested_subshell(size: int = COMMAND_LIMIT) -> str:
    """``( ( ( ls ) ) )``."""
    return _nest("", "( ", "ls", " )", size)


def nested_subshell_redirects(size: int = COMMAND_LIMIT) -> str:
    """``( ( ls ) >f ) >f``: each level adds a redirect every inner command inherits."""
    return _nest("", "( ", "ls", " )>f", size)


def nested_braces_redirects(size: int = COMMAND_LIMIT) -> str:
    """``{ { ls; } >f; } >f``: the same with group commands."""
    return _nest("", "{ ", "ls;", " }>f;", size)


def long_pipeline(size: int = COMMAND_LIMIT) -> str:
    """``ls | ls | ... | ls``."""
    return _repeat("", "ls | ", "ls", size)


def decode_pipeline(size: int = COMMAND_LIMIT) -> str:
    """``base64 -d | sh | sh | ...``: every shell reads what a decoder decodes."""
    return _repeat("base64 -d", " | sh", "", size)


def many_heredocs(size: int = COMMAND_LIMIT) -> str:
    """``cat <<E`` ... ``E`` many times."""
    return _repeat("", "cat <<E\nx\nE\n", "", size)


def heredocs_to_shell(size: int = COMMAND_LIMIT) -> str:
    """``bash <<E`` with a body of many commands, then more commands."""
    body = _repeat("", "ls\n", "", size // 2)
    return "bash <<E\n" + body + "E\n" + _repeat("", "ls\n", "", size - len(body) - 12)


def eval_and_commands(size: int = COMMAND_LIMIT) -> str:
    """``eval a a a ...; b; b; b``: many words to check against many commands."""
    half = _repeat("eval", " a", "", size // 2)
    return half + _repeat("", ";b", "", size - len(half))


def many_commands(size: int = COMMAND_LIMIT) -> str:
    """``a;a;a;...``: the most simple commands a line can hold."""
    return _repeat("", "a;", "a", size)


def many_words(size: int = COMMAND_LIMIT) -> str:
    """``echo a a a ...``: one command with the most words."""
    return _repeat("echo", " a", "", size)


SHAPES: Final[dict[str, Callable[[int], str]]] = {
    "nested $(": nested_cmdsub,
    'nested "$(': nested_cmdsub_quoted,
    "nested ${": nested_param,
    "nested ${ $(": nested_param_cmdsub,
    "nested <(": nested_procsub,
    "deep subshells": nested_subshell,
    "deep subshells >f": nested_subshell_redirects,
    "deep { } >f": nested_braces_redirects,
    "long pipeline": long_pipeline,
    "decode | sh | sh": decode_pipeline,
    "many heredocs": many_heredocs,
    "bash <<heredoc": heredocs_to_shell,
    "eval words; cmds": eval_and_commands,
    "many commands": many_commands,
    "many words": many_words,
}
