"""The daemon's static pass reads the policy bundle's own command catalog (`commands:`).

A real daemon on a temp socket, with a policy that declares an in-house tool: its option
`--target` takes a value and its subcommand `delete` is destructive (issue 14, class 7)."""

from __future__ import annotations

from pathlib import Path

from airlock.types import FindingSource, Verdict
from tests.helpers import running_daemon

POLICY = """\
version: 1
commands:
  deploytool:
    options_with_value: [--target]
    subcommands:
      status: {action: read}
      delete: {risk: destructive}
rules:
  - id: inhouse.deploy-destructive
    title: Destructive deploytool subcommand
    description: A deploytool subcommand the bundle's catalog says destroys.
    decision: ask
    severity: high
    match:
      argv0: [deploytool]
      classified: {risk: [destructive]}
  - id: inhouse.deploy-prod
    title: deploytool against production
    description: A deploytool command whose --target is prod.
    decision: ask
    severity: medium
    match:
      argv0: [deploytool]
      option_values: {flags: [--target], any: [prod]}
"""


def test_static_pass_uses_the_bundles_catalog(public_tmp: Path) -> None:
    policy = public_tmp / "policy"
    policy.mkdir()
    (policy / "inhouse.yaml").write_text(POLICY)
    with running_daemon(public_tmp, "--policy-dir", str(policy)) as d, d.client() as c:
        v = c.validate("deploytool --target prod delete", cwd="/tmp")
        assert v.verdict is Verdict.ASK
        static = {f.rule_id for f in v.findings if f.source is FindingSource.STATIC}
        assert static == {"inhouse.deploy-destructive", "inhouse.deploy-prod"}
        # `delete` here is the value of --target, not the subcommand: not destructive
        v = c.validate("deploytool --target delete status", cwd="/tmp")
        assert not {f.rule_id for f in v.findings if f.source is FindingSource.STATIC}
