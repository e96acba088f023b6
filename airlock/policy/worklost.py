"""Lost work in words: the phrases the summary, the ``work_lost`` effect key and the
built-in finding use for what a dry run would destroy in a git repository
(:class:`airlock.types.LostWork`, found by :mod:`airlock.sandbox.gitloss`). Pure code.

"discards uncommitted changes to README.md", "deletes 3 untracked files (a, b, c)",
"drops 2 commits not on any other branch", "drops 1 stash entry".
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from airlock.types import Finding, FindingSource, LostKind, LostWork, Severity, Verdict

__all__ = ["LOST_KINDS", "WORK_LOST_RULE", "builtin_findings", "phrases", "summary_sentence"]

WORK_LOST_RULE = "builtin.work-lost"
# The names an effect rule's ``work_lost.kinds`` uses.
LOST_KINDS: Mapping[str, LostKind] = {k.name.lower(): k for k in LostKind}
_LISTED = 3


def _shown(w: LostWork, workspace: str) -> str:
    path = w.path.decode(errors="backslashreplace")
    base = workspace.rstrip("/") or w.repo.decode(errors="backslashreplace")
    if base and (path == base or path.startswith(base + "/")):
        rel = os.path.relpath(path, base) + ("/" if path.endswith("/") else "")
        return rel
    return path


def _files(items: Sequence[LostWork], workspace: str, n: int) -> str:
    """The first files by name, then how many more (an entry without a path stands for
    ``count`` files past the check's listing bound)."""
    names = [_shown(w, workspace) for w in items if w.path][:_LISTED]
    if not names:
        return ""
    more = f" and {n - len(names)} more" if n > len(names) else ""
    return f" ({', '.join(names)}{more})"


def phrases(items: Sequence[LostWork], workspace: str = "") -> list[str]:
    """One phrase per kind of loss in ``items``, in LostKind order."""
    out: list[str] = []
    by_kind: dict[LostKind, list[LostWork]] = {}
    for w in items:
        by_kind.setdefault(w.kind, []).append(w)
    for kind in LostKind:
        group = by_kind.get(kind, [])
        if not group:
            continue
        n = sum(w.count if not w.path else 1 for w in group)
        if kind is LostKind.UNCOMMITTED:
            if n == 1 and group[0].path:
                out.append(f"discards uncommitted changes to {_shown(group[0], workspace)}")
            else:
                files = _files(group, workspace, n)
                out.append(f"discards uncommitted changes to {n} files{files}")
        elif kind in (LostKind.UNTRACKED, LostKind.IGNORED):
            noun = "file" if n == 1 else "files"
            adjective = kind.name.lower()
            out.append(f"deletes {n} {adjective} {noun}{_files(group, workspace, n)}")
        elif kind is LostKind.COMMITS:
            c = sum(w.count for w in group)
            out.append(f"drops {c} commit{'s' if c != 1 else ''} not on any other branch")
        elif kind is LostKind.STASH:
            c = sum(w.count for w in group)
            out.append(f"drops {c} stash {'entry' if c == 1 else 'entries'}")
        else:
            why = "; ".join(dict.fromkeys(w.detail for w in group if w.detail))
            out.append("could not check for lost work" + (f" ({why})" if why else ""))
    return out


def summary_sentence(items: Sequence[LostWork], workspace: str = "") -> str:
    """The summary's sentence on lost work ("" when none); ignored files are left to the
    policy's findings (most are build output)."""
    shown = [w for w in items if w.kind is not LostKind.IGNORED]
    lost = [w for w in shown if w.kind is not LostKind.UNCHECKED]
    unchecked = [w for w in shown if w.kind is LostKind.UNCHECKED]
    sentences = []
    if lost:
        text = "; ".join(phrases(lost, workspace))
        sentences.append(f"Loses work that exists nowhere else: {text}.")
    if unchecked:
        text = phrases(unchecked, workspace)[0]
        sentences.append(text[0].upper() + text[1:] + ".")
    return " ".join(sentences)


def builtin_findings(items: Sequence[LostWork], workspace: str = "") -> tuple[Finding, ...]:
    """For a policy without effect rules: lost work (ignored files aside) asks."""
    counted = [w for w in items if w.kind is not LostKind.IGNORED]
    if not counted:
        return ()
    return (
        Finding(
            rule_id=WORK_LOST_RULE,
            verdict=Verdict.ASK,
            severity=Severity.HIGH,
            message="Loses work that exists nowhere else: "
            + "; ".join(phrases(counted, workspace))
            + ".",
            source=FindingSource.BUILTIN,
        ),
    )
