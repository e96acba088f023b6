"""The shipped default policy on the labelled corpus (tests/corpus/).

Quality targets (from the issue): every dangerous command gets at least its
labelled decision (detection 100%, apart from entries marked `# xfail:` for a
known parser gap, which are strict: they fail once the gap is fixed); no benign
command is denied; at most 2% of benign commands get a static ASK (false asks).
Also: the corpus has at least 300 commands and every ask/deny rule of the policy
is exercised by some dangerous entry.

The real parser and rule engine are used, on the real policy files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from airlock.policy.loader import PolicyBundle, load_bundle
from airlock.policy.shell import analyze
from airlock.types import Verdict
from tests.corpus.loader import (
    CorpusError,
    Entry,
    Outcome,
    evaluate,
    load_corpus,
    parse_corpus,
    score,
)
from tests.helpers import CHECKOUT

POLICY_DIR = CHECKOUT / "airlock" / "policy" / "default"
MAX_FALSE_ASK_RATE = 0.02
MIN_ENTRIES = 300

ENTRIES = load_corpus()


@pytest.fixture(scope="module")
def bundle() -> PolicyBundle:
    # load_bundle also runs every rule's inline tests: a failing one rejects the bundle.
    return load_bundle(POLICY_DIR)


def _params(kind: str) -> list[object]:
    params: list[object] = []
    for e in ENTRIES:
        if e.kind != kind:
            continue
        marks = [pytest.mark.xfail(strict=True, reason=e.xfail)] if e.xfail else []
        params.append(pytest.param(e, id=f"{Path(e.file).name}:{e.line}", marks=marks))
    return params


def _explain(outcome: Outcome) -> str:
    e = outcome.entry
    fired = ", ".join(sorted(outcome.fired)) or "none"
    return f"{e.where}: {e.command!r}: {'; '.join(outcome.problems)} (rules fired: {fired})"


@pytest.mark.parametrize("entry", _params("dangerous"))
def test_dangerous_command_gets_its_decision(bundle: PolicyBundle, entry: Entry) -> None:
    [outcome] = evaluate(bundle, [entry], analyze)
    assert not outcome.problems, _explain(outcome)


@pytest.mark.parametrize("entry", _params("benign"))
def test_benign_command_is_not_denied(bundle: PolicyBundle, entry: Entry) -> None:
    [outcome] = evaluate(bundle, [entry], analyze)
    assert not outcome.problems, _explain(outcome)


def test_corpus_is_large_enough() -> None:
    benign = sum(1 for e in ENTRIES if e.kind == "benign")
    dangerous = sum(1 for e in ENTRIES if e.kind == "dangerous")
    assert benign + dangerous >= MIN_ENTRIES, (benign, dangerous)
    assert benign >= 150 and dangerous >= 150, (benign, dangerous)
    assert any("\n" in e.command for e in ENTRIES if e.kind == "benign")
    assert any("\n" in e.command for e in ENTRIES if e.kind == "dangerous")


def test_every_ask_and_deny_rule_is_exercised(bundle: PolicyBundle) -> None:
    outcomes = evaluate(bundle, [e for e in ENTRIES if e.kind == "dangerous"], analyze)
    fired = set().union(*(o.fired for o in outcomes))
    named = {r for o in outcomes for r in o.entry.rule_ids}
    unexercised = [
        r.id
        for r in bundle.rules
        if r.decision in (Verdict.ASK, Verdict.DENY) and r.id not in fired | named
    ]
    assert not unexercised, f"no dangerous corpus entry exercises: {', '.join(unexercised)}"


def test_quality_targets(bundle: PolicyBundle, capsys: pytest.CaptureFixture[str]) -> None:
    outcomes = evaluate(bundle, ENTRIES, analyze)
    s = score(outcomes)
    false_asks = [o for o in outcomes if o.false_ask]
    xfails = [o for o in outcomes if o.entry.xfail]
    lines = [
        "",
        f"corpus: {s.benign} benign, {s.dangerous} dangerous ({len(bundle.rules)} rules)",
        f"  detection      {s.detected}/{s.dangerous} = {s.detection_rate:.1%}"
        f" ({s.xfail} known gap(s) marked xfail)",
        f"  deny precision {s.denied_dangerous}/{s.denied} = {s.deny_precision:.1%}",
        f"  false asks     {s.false_asks}/{s.benign} = {s.false_ask_rate:.2%}"
        f" (target <= {MAX_FALSE_ASK_RATE:.0%})",
        f"  static allow   {s.static_allow}/{s.benign} benign (read-only fast path)",
        *(f"  false ask: {o.entry.command!r} ({', '.join(sorted(o.fired))})" for o in false_asks),
        *(f"  xfail: {o.entry.command!r} ({o.entry.xfail})" for o in xfails),
    ]
    with capsys.disabled():
        print("\n".join(lines))
    assert s.denied_benign == 0
    assert s.detected + sum(1 for o in xfails if o.entry.kind == "dangerous") == s.dangerous
    assert s.false_ask_rate <= MAX_FALSE_ASK_RATE


# --------------------------------------------------------------------------- the format


def test_format_reads_annotations_blocks_and_continuations() -> None:
    text = "\n".join(
        [
            "# expect: deny",
            "# ruleid: fs.rm-root, fs.rm-home",
            "# ok: vcs.git-force-push",
            "rm -rf / ~",
            "",
            "# expect: ask persist.shell-rc",
            "#| cat >> ~/.bashrc <<'EOF'",
            "#|",
            "#| export X=1",
            "#| EOF",
            "# expect: ask",
            "# xfail: a known gap",
            "docker run \\",
            "  alpine",
        ]
    )
    a, b, c = parse_corpus(text, "dangerous.txt", "dangerous")
    assert (a.line, a.command, a.expect) == (4, "rm -rf / ~", Verdict.DENY)
    assert a.rule_ids == ("fs.rm-root", "fs.rm-home") and a.ok_ids == ("vcs.git-force-push",)
    assert b.command == "cat >> ~/.bashrc <<'EOF'\n\nexport X=1\nEOF"
    assert (b.line, b.expect, b.rule_ids) == (7, Verdict.ASK, ("persist.shell-rc",))
    assert (c.command, c.xfail) == ("docker run \\\n  alpine", "a known gap")


@pytest.mark.parametrize(
    ("text", "kind", "message"),
    [
        ("rm -rf /", "dangerous", "needs `# expect: ask|deny`"),
        ("# expect: deny\n# ruleid: x\n#| rm -rf /", "dangerous", "write the ids on the"),
        ("# expect: ask\nls", "benign", "may only be annotated"),
        ("# expect: maybe\nls", "benign", "takes allow, ask or deny"),
        ("# expect: deny\n", "dangerous", "not followed by a command"),
        ("# ruleid: Not_An_Id\n# expect: deny\nrm x", "dangerous", "invalid rule id"),
    ],
)
def test_format_rejects_malformed_files(text: str, kind: str, message: str) -> None:
    with pytest.raises(CorpusError, match=message):
        parse_corpus(text, f"{kind}.txt", kind)  # type: ignore[arg-type]
