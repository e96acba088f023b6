"""Effect rules, measured: how long ``PolicyBundle.judge_effects`` takes on a large dry run.

The bundle is the shipped ``airlock/policy/default`` (its effect rules) plus generated effect
rules shaped like real ones, up to ``--rules`` effect rules in all: path globs with a
literal prefix (``/opt/vendorN/**``, ``~/.config/toolN/**``), globs that match a file
name at any depth (``secretsN.yaml``), a few that must scan every path (``*.keyN``),
scope/kind filters, network and program rules. The effects are a build-like dry run:
``--changes`` changed paths, most in the workspace, some in ``~/.cache``, ``/tmp`` and
``/usr/local``, plus processes and network attempts.

Two cases: ``typical`` (as above) and ``worst`` (every change is outside the workspace
and matches a rule that must test every path). Prints a table, then one JSON object
(the last line). Nothing is asserted: this is a measurement.

Usage: ``.venv/bin/python bench/effects.py [--runs N] [--rules N] [--changes N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _stats import format_table, ms, summarize  # noqa: E402

from airlock.policy.loader import PolicyBundle, load_bundle  # noqa: E402
from airlock.types import (  # noqa: E402
    ChangeKind,
    Effects,
    FileChange,
    FileType,
    NetProtocol,
    NetworkAttemptInfo,
    ProcessInfo,
)

POLICY_DIR = ROOT / "airlock" / "policy" / "default"
HOME = "/home/dev"
WORKSPACE = "/home/dev/project"


def generated_rules(n: int) -> str:
    """YAML text of ``n`` effect rules, few of which fire on the generated effects."""
    out = ["version: 1", "rules:"] if n else ["version: 1"]
    for i in range(n):
        kind = i % 10
        if kind < 3:
            effect = f"{{files: {{paths: ['/opt/vendor{i}/**', '/etc/app{i}.conf']}}}}"
        elif kind < 5:
            effect = f"{{files: {{paths: ['~/.config/tool{i}/**'], kinds: [created, modified]}}}}"
        elif kind == 5:
            effect = f"{{files: {{paths: ['secrets{i}.yaml', '**/deploy{i}/*.pem']}}}}"
        elif kind == 6:
            effect = f"{{files: {{paths: ['*.key{i}'], scope: [home, system]}}}}"
        elif kind == 7:
            effect = "{files: {scope: [temp], kinds: [deleted]}}"
        elif kind == 8:
            effect = f"{{network: {{hosts: ['*.bad{i}.example'], ports: [443, '8000-8999']}}}}"
        else:
            effect = f"{{programs: {{argv0: [tool{i}], args: ['--upload*']}}}}"
        out.append(
            f"  - {{id: gen.r{i}, title: Generated rule {i}, description: d, decision: ask, "
            f"severity: low, effect: {effect}}}"
        )
    return "\n".join(out) + "\n"


def typical_effects(changes: int) -> Effects:
    out: list[FileChange] = []
    for i in range(changes):
        bucket = i % 100
        if bucket < 94:
            path, inside = f"{WORKSPACE}/build/pkg{i % 37}/mod{i}.o", True
        elif bucket < 98:
            path, inside = f"{HOME}/.cache/pip/http/{i:04x}/entry", False
        elif bucket < 99:
            path, inside = f"/tmp/cc{i}.s", False
        else:
            path, inside = f"/usr/local/lib/python3.11/site-packages/m{i}.py", False
        out.append(
            FileChange(
                path=path.encode(),
                kind=ChangeKind.CREATED,
                file_type=FileType.REGULAR,
                in_workspace=inside,
            )
        )
    processes = tuple(
        ProcessInfo(pid=i, ppid=1, argv=(b"cc", b"-c", f"mod{i}.c".encode())) for i in range(20)
    )
    network = (
        NetworkAttemptInfo(NetProtocol.DNS, "127.0.0.53", 53, dns_name="pypi.org"),
        NetworkAttemptInfo(NetProtocol.TCP, "198.18.0.1", 443, dns_name="pypi.org", sni="pypi.org"),
    )
    return Effects(
        workspace=WORKSPACE, home=HOME, changes=tuple(out), processes=processes, network=network
    )


def worst_effects(changes: int) -> Effects:
    out = tuple(
        FileChange(
            path=f"{HOME}/keys/k{i}.key{(i % 10) * 10 + 6}".encode(),
            kind=ChangeKind.MODIFIED,
            file_type=FileType.REGULAR,
        )
        for i in range(changes)
    )
    return Effects(workspace=WORKSPACE, home=HOME, changes=out)


def _time(bundle: PolicyBundle, effects: Effects, runs: int) -> tuple[list[float], int]:
    bundle.judge_effects(effects)  # warm up
    seconds = []
    findings = 0
    for _ in range(runs):
        t0 = time.perf_counter()
        found = bundle.judge_effects(effects)
        seconds.append(time.perf_counter() - t0)
        findings = len(found)
    return seconds, findings


def run(*, runs: int = 2000, rules: int = 50, changes: int = 1000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        shipped = len(load_bundle(POLICY_DIR, run_tests=False).effect_rules)
        extra = Path(tmp) / "generated.yaml"
        extra.write_text(generated_rules(max(0, rules - shipped)))
        bundle = load_bundle([POLICY_DIR, extra], run_tests=False)
    result: dict[str, Any] = {
        "effect_rules": len(bundle.effect_rules),
        "changes": changes,
        "runs": runs,
    }
    for name, effects in (
        ("typical", typical_effects(changes)),
        ("worst", worst_effects(changes)),
    ):
        seconds, findings = _time(bundle, effects, runs)
        result[name] = {"findings": findings, "judge_ms": summarize(seconds)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--rules", type=int, default=50)
    parser.add_argument("--changes", type=int, default=1000)
    args = parser.parse_args()
    result = run(runs=args.runs, rules=args.rules, changes=args.changes)
    rows = [
        [case, str(result[case]["findings"]), ms(result[case]["judge_ms"]),
         ms(result[case]["judge_ms"], "p99")]
        for case in ("typical", "worst")
    ]  # fmt: skip
    title = (
        f"judge_effects: {result['effect_rules']} effect rules, {result['changes']} changes, "
        f"{result['runs']} runs"
    )
    print(format_table(title, ["case", "findings", "p50 ms", "p99 ms"], rows))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
