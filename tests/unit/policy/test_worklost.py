"""Lost work in words, as an effect key, and the static rule that gives way to it."""

from __future__ import annotations

from airlock.policy.effects import judges_work_lost
from airlock.policy.loader import load_bundle
from airlock.policy.worklost import builtin_findings, phrases, summary_sentence
from airlock.types import Effects, LostKind, LostWork, Verdict
from tests.helpers import CHECKOUT

WS = "/w/proj"
R = b"/w/proj"


def test_phrases_name_files_and_count() -> None:
    items = [
        LostWork(LostKind.UNCOMMITTED, R, R + b"/README.md"),
        *(LostWork(LostKind.UNTRACKED, R, R + b"/u%d" % i) for i in range(5)),
        LostWork(LostKind.COMMITS, R, count=2),
        LostWork(LostKind.STASH, R, count=1),
    ]
    assert phrases(items, WS) == [
        "discards uncommitted changes to README.md",
        "deletes 5 untracked files (u0, u1, u2 and 2 more)",
        "drops 2 commits not on any other branch",
        "drops 1 stash entry",
    ]


def test_summary_leaves_ignored_files_to_the_policy() -> None:
    items = [LostWork(LostKind.IGNORED, R, R + b"/build/"), LostWork(LostKind.COMMITS, R)]
    assert summary_sentence(items, WS) == (
        "Loses work that exists nowhere else: drops 1 commit not on any other branch."
    )
    assert summary_sentence([LostWork(LostKind.IGNORED, R, R + b"/build/")], WS) == ""
    unchecked = [LostWork(LostKind.UNCHECKED, R, detail="the check ran out of time")]
    assert summary_sentence(unchecked, WS) == (
        "Could not check for lost work (the check ran out of time)."
    )


def test_the_builtin_finding_asks() -> None:
    [f] = builtin_findings([LostWork(LostKind.STASH, R, count=3)], WS)
    assert f.verdict is Verdict.ASK and f.rule_id == "builtin.work-lost"
    assert "drops 3 stash entries" in f.message
    assert builtin_findings([LostWork(LostKind.IGNORED, R, R + b"/node_modules/")], WS) == ()


def test_the_shipped_rule_judges_lost_work() -> None:
    bundle = load_bundle(CHECKOUT / "airlock" / "policy" / "default")
    assert judges_work_lost(bundle.effect_rules)
    assert not judges_work_lost(())
    reset = [r for r in bundle.rules if r.id == "vcs.git-reset-hard"]
    assert reset and "dry-run-checks-lost-work" in reset[0].tags

    def fired(*items: LostWork) -> list[str]:
        effects = Effects(workspace=WS, home="/home/u", work_lost=items)
        return [f.message for f in bundle.judge_effects(effects) if f.rule_id == "effect.work-lost"]

    [message] = fired(LostWork(LostKind.UNCOMMITTED, R, R + b"/src/a.py"))
    assert message.endswith("discards uncommitted changes to src/a.py")
    assert fired(LostWork(LostKind.IGNORED, R, R + b"/.env"))
    assert fired(LostWork(LostKind.IGNORED, R, R + b"/config/.env.local"))
    assert not fired(LostWork(LostKind.IGNORED, R, R + b"/target/"))
    assert not fired()


def test_files_past_the_listing_bound_are_counted() -> None:
    items = [
        LostWork(LostKind.UNTRACKED, R, R + b"/a"),
        LostWork(LostKind.UNTRACKED, R, R + b"/b"),
        LostWork(LostKind.UNTRACKED, R, count=40),
        LostWork(LostKind.UNCOMMITTED, R, count=7),
    ]
    assert phrases(items, WS) == [
        "discards uncommitted changes to 7 files",
        "deletes 42 untracked files (a, b and 40 more)",
    ]
