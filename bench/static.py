"""The static pass, measured: quality on the labelled corpus and latency per command.

Reports, over ``tests/corpus`` with the shipped ``airlock/policy/default``:

* quality: detection rate (dangerous commands that get at least their labelled
  decision), deny precision (static denies that are labelled dangerous), false-ask
  rate (benign commands with a static ASK), static-allow share of benign commands;
* latency per command of the static pass (parse + evaluate), p50/p99, and its two
  halves (parse only, evaluate only);
* the same with a generated 500-rule policy (to see how evaluation scales with the
  number of rules): p50/p99 of parse + evaluate and of evaluate alone.

Prints a table and then one JSON object (the last line of the output). Nothing is
asserted here: the targets are asserted by ``tests/unit/policy/test_corpus.py``.

Usage: ``.venv/bin/python bench/static.py [--runs N] [--rules N] [--out PATH]``.
Callable from other scripts as ``static.run(runs=..., rules=...)`` (returns the dict).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _stats import format_table, ms, summarize  # noqa: E402

from airlock.policy.loader import PolicyBundle, load_bundle  # noqa: E402
from airlock.policy.model import Analysis  # noqa: E402
from airlock.policy.shell import analyze  # noqa: E402
from tests.corpus.loader import Entry, evaluate, load_corpus, score  # noqa: E402

POLICY_DIR = ROOT / "airlock" / "policy" / "default"

# Real command names, so that generated rules indexed by name are actually evaluated.
# fmt: off
_COMMON = ["git", "npm", "rm", "curl", "python3", "pytest", "make", "docker", "cargo", "go",
           "ls", "cat", "grep", "find", "sed", "tar", "cp", "mv", "chmod", "echo", "pip"]
# fmt: on


def generated_policy(n: int, seed: int = 1) -> str:
    """YAML text of a synthetic policy with ``n`` rules, shaped like real ones: most are
    indexed by command name (half of them on common commands), a fifth match every
    command (redirects, args), a tenth are line regexes. Few of them ever fire."""
    rnd = random.Random(seed)
    out = ["version: 1", "rules:"]
    for i in range(n):
        kind = rnd.random()
        if kind < 0.7:
            name = rnd.choice(_COMMON) if rnd.random() < 0.5 else f"tool{i:04d}"
            match = (
                f"{{argv0: [{name}], flags: {{any: [--gen-flag-{i}, -Z]}}, "
                f'positionals: {{any: ["*.gen{i}", "/gen/{i}/*"]}}}}'
            )
        elif kind < 0.9:
            match = f'{{redirects: {{any: ["/gen/{i}/*"]}}, args: {{any: ["--gen-{i}=*"]}}}}'
        else:
            match = f"{{regex: 'gen-marker-{i}\\b'}}"
        out += [
            f"  - id: gen.rule-{i:04d}",
            f"    title: Generated rule {i}",
            "    description: A synthetic rule for the benchmark.",
            f"    decision: {rnd.choice(['ask', 'deny'])}",
            "    severity: low",
            f"    match: {match}",
        ]
    return "\n".join(out) + "\n"


def _time_static(
    bundle: PolicyBundle, commands: Sequence[str], runs: int
) -> tuple[list[float], list[float], list[float]]:
    """Per-command seconds of parse + evaluate, parse alone and evaluate alone."""
    total: list[float] = []
    parse: list[float] = []
    judge: list[float] = []
    clock = time.perf_counter
    for _ in range(runs):
        for command in commands:
            t0 = clock()
            analysis = analyze(command)
            t1 = clock()
            bundle.evaluate(analysis)
            t2 = clock()
            total.append(t2 - t0)
            parse.append(t1 - t0)
            judge.append(t2 - t1)
    return total, parse, judge


def _time_evaluate(bundle: PolicyBundle, analyses: Sequence[Analysis], runs: int) -> list[float]:
    out: list[float] = []
    clock = time.perf_counter
    for _ in range(runs):
        for a in analyses:
            t0 = clock()
            bundle.evaluate(a)
            out.append(clock() - t0)
    return out


def run(
    runs: int = 5, rules: int = 500, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Measure everything; return the figures as a JSON-ready dict (times in ms)."""
    say = log or (lambda _s: None)
    t0 = time.perf_counter()
    bundle = load_bundle(POLICY_DIR)  # with its inline tests, as the daemon loads it
    load_s = time.perf_counter() - t0
    entries: list[Entry] = load_corpus()
    commands = [e.command for e in entries]
    say(f"{len(bundle.rules)} rules, {len(entries)} corpus commands, {runs} run(s)")

    quality = score(evaluate(bundle, entries, analyze)).as_dict()
    _time_static(bundle, commands, 1)  # warm-up: caches, first tree-sitter parsers
    total, parse, judge = _time_static(bundle, commands, runs)

    with tempfile.TemporaryDirectory(prefix="airlock-bench-policy-") as tmp:
        Path(tmp, "generated.yaml").write_text(generated_policy(rules))
        t0 = time.perf_counter()
        big = load_bundle(tmp, run_tests=False)
        big_load_s = time.perf_counter() - t0
    analyses = [analyze(c) for c in commands]
    _time_evaluate(big, analyses, 1)
    big_total, _big_parse, big_judge = _time_static(big, commands, runs)

    return {
        "policy": {
            "rules": len(bundle.rules),
            "files": len(bundle.files),
            "load_ms": round(load_s * 1000, 1),
        },
        "corpus": {"commands": len(entries)},
        "quality": quality,
        "latency_ms": {
            "static": summarize(total),
            "parse": summarize(parse),
            "evaluate": summarize(judge),
        },
        "generated_policy": {
            "rules": len(big.rules),
            "load_ms": round(big_load_s * 1000, 1),
            "static": summarize(big_total),
            "evaluate": summarize(big_judge),
        },
    }


def table(result: dict[str, Any]) -> str:
    q = result["quality"]
    lat = result["latency_ms"]
    gen = result["generated_policy"]
    quality_rows = [
        ["detection rate", f"{q['detection_rate']:.1%}", f"{q['detected']}/{q['dangerous']}"],
        ["deny precision", f"{q['deny_precision']:.1%}", f"{q['denied']} denied"],
        ["false-ask rate", f"{q['false_ask_rate']:.2%}", f"{q['false_asks']}/{q['benign']}"],
        ["static allow (benign)", f"{q['static_allow'] / max(q['benign'], 1):.1%}",
         f"{q['static_allow']}/{q['benign']}"],
        ["known gaps (xfail)", str(q["xfail"]), ""],
    ]  # fmt: skip
    latency_rows = [
        [f"default ({result['policy']['rules']} rules): parse + evaluate", ms(lat["static"]),
         ms(lat["static"], "p99")],
        ["  parse only", ms(lat["parse"]), ms(lat["parse"], "p99")],
        ["  evaluate only", ms(lat["evaluate"]), ms(lat["evaluate"], "p99")],
        [f"generated ({gen['rules']} rules): parse + evaluate", ms(gen["static"]),
         ms(gen["static"], "p99")],
        ["  evaluate only", ms(gen["evaluate"]), ms(gen["evaluate"], "p99")],
    ]  # fmt: skip
    return "\n".join(
        [
            format_table(
                f"Static pass quality ({result['corpus']['commands']} corpus commands)",
                ["figure", "value", "detail"],
                quality_rows,
            ),
            format_table("Static pass latency per command (ms)", ["", "p50", "p99"], latency_rows),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="passes over the corpus (default 5)")
    parser.add_argument("--rules", type=int, default=500, help="size of the generated policy")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    result = run(runs=args.runs, rules=args.rules, log=lambda s: print(s, file=sys.stderr))
    print(table(result))
    text = json.dumps(result, sort_keys=True)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
