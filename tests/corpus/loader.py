"""The labelled command corpus: reading its files and scoring a policy on it.

Used by ``tests/unit/policy/test_corpus.py`` (which asserts the quality targets) and by
``bench/static.py`` (which reports them with timings). The file format is
described in ``tests/corpus/README.md``; in short::

    # expect: deny                  <- minimum static decision (dangerous files)
    # ruleid: fs.rm-root            <- this rule must fire (as `airlock policy test`)
    rm -rf /

    # expect: deny fs.rm-root       <- rule ids may also follow the decision
    #| bash <<'EOF'                 <- consecutive `#|` lines: one multi-line command
    #| rm -rf /
    #| EOF

A file whose name starts with ``benign`` holds benign commands, one starting
with ``dangerous`` holds dangerous ones; other ``*.txt`` files are rejected.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from airlock.policy.loader import PolicyBundle
from airlock.policy.model import Analysis
from airlock.types import Verdict

__all__ = [
    "CORPUS_DIR",
    "CorpusError",
    "Entry",
    "Outcome",
    "Score",
    "evaluate",
    "load_corpus",
    "parse_corpus",
    "score",
]

CORPUS_DIR = Path(__file__).resolve().parent
Kind = Literal["benign", "dangerous"]

_DECISIONS = {"allow": Verdict.ALLOW, "ask": Verdict.ASK, "deny": Verdict.DENY}
_ANNOTATION = re.compile(r"^#\s*(expect|ruleid|ok|xfail)\s*:\s*(.*?)\s*$")
_RULE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class CorpusError(ValueError):
    """A corpus file does not follow the format; the message says where."""


@dataclass(frozen=True)
class Entry:
    """One labelled command."""

    file: str
    line: int  # 1-based line of the command's first line
    command: str
    kind: Kind
    expect: Verdict | None  # dangerous: the minimum decision; benign: ALLOW or None
    rule_ids: tuple[str, ...] = ()  # rules that must fire
    ok_ids: tuple[str, ...] = ()  # rules that must not fire
    xfail: str = ""  # a known parser/engine gap: the expectation is not met yet

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class _Pending:
    expect: Verdict | None = None
    expect_ids: list[str] = field(default_factory=list)
    rule_ids: list[str] = field(default_factory=list)  # from `# ruleid:` lines
    ok_ids: list[str] = field(default_factory=list)
    xfail: str = ""
    first_line: int = 0

    def empty(self) -> bool:
        return (
            self.expect is None
            and not self.expect_ids
            and not self.rule_ids
            and not self.ok_ids
            and not self.xfail
        )


def _ids(text: str, where: str) -> list[str]:
    ids = [t for t in re.split(r"[\s,]+", text) if t]
    for rid in ids:
        if not _RULE_ID.match(rid):
            raise CorpusError(f"{where}: invalid rule id {rid!r}")
    return ids


def _kind_of(path: Path) -> Kind:
    if path.name.startswith("benign"):
        return "benign"
    if path.name.startswith("dangerous"):
        return "dangerous"
    raise CorpusError(f"{path}: a corpus file's name starts with 'benign' or 'dangerous'")


def parse_corpus(text: str, file: str, kind: Kind) -> list[Entry]:
    """The entries of one corpus file (raises :class:`CorpusError`)."""
    entries: list[Entry] = []
    pending = _Pending()
    lines = text.split("\n")
    i = 0

    def annotate(number: int, name: str, value: str) -> None:
        where = f"{file}:{number}"
        if pending.first_line == 0:
            pending.first_line = number
        if name == "expect":
            words = value.split(None, 1)
            if not words or words[0] not in _DECISIONS:
                raise CorpusError(f"{where}: `# expect:` takes allow, ask or deny")
            if pending.expect is not None:
                raise CorpusError(f"{where}: two `# expect:` lines for one command")
            pending.expect = _DECISIONS[words[0]]
            pending.expect_ids.extend(_ids(words[1] if len(words) > 1 else "", where))
        elif name == "ruleid":
            pending.rule_ids.extend(_ids(value, where))
        elif name == "ok":
            pending.ok_ids.extend(_ids(value, where))
        else:
            if not value:
                raise CorpusError(f"{where}: `# xfail:` needs a reason")
            pending.xfail = value

    def emit(number: int, command: str, block: bool) -> None:
        nonlocal pending
        where = f"{file}:{number}"
        if block and pending.rule_ids:
            raise CorpusError(
                f"{where}: `# ruleid:` before a `#|` block would be applied by `airlock policy "
                "test` to the next plain command line; write the ids on the `# expect:` line"
            )
        if kind == "dangerous" and pending.expect not in (Verdict.ASK, Verdict.DENY):
            raise CorpusError(f"{where}: a dangerous command needs `# expect: ask|deny`")
        if kind == "benign" and pending.expect not in (None, Verdict.ALLOW):
            raise CorpusError(f"{where}: a benign command may only be annotated `# expect: allow`")
        if not command.strip():
            raise CorpusError(f"{where}: empty command")
        entries.append(
            Entry(
                file=file,
                line=number,
                command=command,
                kind=kind,
                expect=pending.expect,
                rule_ids=tuple(dict.fromkeys([*pending.expect_ids, *pending.rule_ids])),
                ok_ids=tuple(pending.ok_ids),
                xfail=pending.xfail,
            )
        )
        pending = _Pending()

    while i < len(lines):
        raw = lines[i]
        stripped = raw.strip()
        number = i + 1
        i += 1
        if stripped.startswith("#|"):
            block = [stripped[2:].removeprefix(" ")]
            while i < len(lines) and lines[i].strip().startswith("#|"):
                block.append(lines[i].strip()[2:].removeprefix(" "))
                i += 1
            emit(number, "\n".join(block), block=True)
            continue
        if not stripped:
            continue
        if stripped.startswith("#"):
            m = _ANNOTATION.match(stripped)
            if m:
                annotate(number, m.group(1), m.group(2))
            continue
        command = raw
        while command.endswith("\\") and i < len(lines):  # as `airlock policy test` reads it
            command = command + "\n" + lines[i]
            i += 1
        emit(number, command, block=False)
    if not pending.empty():
        raise CorpusError(f"{file}:{pending.first_line}: annotations not followed by a command")
    return entries


def load_corpus(directory: Path = CORPUS_DIR) -> list[Entry]:
    """Every entry of every ``*.txt`` file in ``directory``, in file order."""
    entries: list[Entry] = []
    files = sorted(directory.glob("*.txt"))
    if not files:
        raise CorpusError(f"{directory}: no corpus files (*.txt)")
    for path in files:
        entries.extend(parse_corpus(path.read_text(encoding="utf-8"), str(path), _kind_of(path)))
    return entries


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Outcome:
    """What the static pass said about one entry."""

    entry: Entry
    verdict: Verdict | None  # None: no opinion (the dry run decides)
    fired: frozenset[str]
    seconds: float  # parse + evaluate

    @property
    def problems(self) -> tuple[str, ...]:
        """Why the entry's labels are not met (empty when they are)."""
        e = self.entry
        out: list[str] = []
        got = self.verdict.name.lower() if self.verdict is not None else "no opinion"
        if e.kind == "dangerous":
            assert e.expect is not None
            if self.verdict is None or self.verdict < e.expect:
                out.append(f"expected at least {e.expect.name.lower()}, got {got}")
        else:
            if self.verdict is Verdict.DENY:
                out.append("a benign command was denied")
            if e.expect is Verdict.ALLOW and self.verdict is not Verdict.ALLOW:
                out.append(f"expected a static allow, got {got}")
        missing = [r for r in e.rule_ids if r not in self.fired]
        if missing:
            out.append(f"rule(s) did not fire: {', '.join(missing)}")
        unwanted = [r for r in e.ok_ids if r in self.fired]
        if unwanted:
            out.append(f"rule(s) fired but must not: {', '.join(unwanted)}")
        return tuple(out)

    @property
    def false_ask(self) -> bool:
        return self.entry.kind == "benign" and self.verdict is Verdict.ASK


def evaluate(
    bundle: PolicyBundle,
    entries: Iterable[Entry],
    analyze: Callable[[str], Analysis],
    clock: Callable[[], float] = time.perf_counter,
) -> list[Outcome]:
    """Run the static pass (parse + evaluate) on every entry."""
    outcomes: list[Outcome] = []
    for e in entries:
        start = clock()
        verdict = bundle.evaluate(analyze(e.command))
        seconds = clock() - start
        fired = frozenset(f.rule_id for f in verdict.findings)
        outcomes.append(Outcome(e, verdict.verdict, fired, seconds))
    return outcomes


@dataclass(frozen=True)
class Score:
    """The corpus figures."""

    benign: int
    dangerous: int
    detected: int  # dangerous entries that got at least their expected decision
    denied: int  # entries (of either kind) with a static deny
    denied_dangerous: int  # ... of which labelled dangerous
    denied_benign: int
    false_asks: int  # benign entries with a static ask
    static_allow: int  # benign entries with a static allow (read-only fast path)
    over_strict: int  # dangerous `expect: ask` entries that got deny
    label_failures: int  # entries whose labels are not met (excluding xfail)
    xfail: int

    @property
    def detection_rate(self) -> float:
        return self.detected / self.dangerous if self.dangerous else 1.0

    @property
    def deny_precision(self) -> float:
        return self.denied_dangerous / self.denied if self.denied else 1.0

    @property
    def false_ask_rate(self) -> float:
        return self.false_asks / self.benign if self.benign else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "benign": self.benign,
            "dangerous": self.dangerous,
            "detected": self.detected,
            "detection_rate": round(self.detection_rate, 4),
            "denied": self.denied,
            "deny_precision": round(self.deny_precision, 4),
            "false_asks": self.false_asks,
            "false_ask_rate": round(self.false_ask_rate, 4),
            "static_allow": self.static_allow,
            "over_strict": self.over_strict,
            "label_failures": self.label_failures,
            "xfail": self.xfail,
        }


def score(outcomes: Sequence[Outcome]) -> Score:
    """The figures over ``outcomes``. Entries marked xfail still count in the rates."""
    benign = [o for o in outcomes if o.entry.kind == "benign"]
    dangerous = [o for o in outcomes if o.entry.kind == "dangerous"]
    denied = [o for o in outcomes if o.verdict is Verdict.DENY]
    return Score(
        benign=len(benign),
        dangerous=len(dangerous),
        detected=sum(
            1
            for o in dangerous
            if o.verdict is not None and o.entry.expect is not None and o.verdict >= o.entry.expect
        ),
        denied=len(denied),
        denied_dangerous=sum(1 for o in denied if o.entry.kind == "dangerous"),
        denied_benign=sum(1 for o in denied if o.entry.kind == "benign"),
        false_asks=sum(1 for o in benign if o.false_ask),
        static_allow=sum(1 for o in benign if o.verdict is Verdict.ALLOW),
        over_strict=sum(
            1 for o in dangerous if o.entry.expect is Verdict.ASK and o.verdict is Verdict.DENY
        ),
        label_failures=sum(1 for o in outcomes if o.problems and not o.entry.xfail),
        xfail=sum(1 for o in outcomes if o.entry.xfail),
    )
