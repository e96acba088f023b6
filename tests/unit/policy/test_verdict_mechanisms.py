"""Issue 14's mechanisms, unit by unit: the ``classified`` matcher (a floor that does not
depend on what this host has) and ``credential_destinations`` (a credential used by its own
tool is not exfiltration); the shipped rules built on them are checked by their inline tests
and the corpus (tests/corpus/*-outside-view.txt, *-host-dependent.txt)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from airlock.policy import shell
from airlock.policy.loader import PolicyBundle, PolicyError, load_bundle
from airlock.policy.store import default_policy_dir
from airlock.types import Effects, NetProtocol, NetworkAttemptInfo, SensitiveReadInfo, Verdict


def bundle(tmp_path: Path, text: str) -> PolicyBundle:
    (tmp_path / "p.yaml").write_text(textwrap.dedent(text))
    return load_bundle(tmp_path)


CLASSIFIED = """\
version: 1
rules:
  - id: t.floor
    title: floor
    description: irreversible outside the workspace
    decision: ask
    severity: high
    match:
      classified: {risk: [irreversible], scope: [user_home, system]}
"""


@pytest.mark.parametrize(
    ("command", "fires"),
    [
        ("rm -rf /home/nobody-here/Documents", True),  # whether or not it exists here
        ("shred -u ~/notes.txt", True),
        ("rm -rf /srv/no-such-dir", True),
        ("rm -rf ./build", False),
        ("rm -rf /tmp/x", False),
        ("cat ~/notes.txt", False),
    ],
)
def test_classified_matches_the_command_model_s_axes(
    tmp_path: Path, command: str, fires: bool
) -> None:
    b = bundle(tmp_path, CLASSIFIED)
    verdict = b.evaluate(shell.analyze(command)).verdict
    assert (verdict is Verdict.ASK) is fires, (command, verdict)


def test_classified_rejects_unknown_axis_values(tmp_path: Path) -> None:
    with pytest.raises(PolicyError):
        bundle(tmp_path, CLASSIFIED.replace("irreversible", "catastrophic"))


def tcp(name: str, port: int = 443) -> NetworkAttemptInfo:
    return NetworkAttemptInfo(
        protocol=NetProtocol.TCP, address="198.18.0.9", port=port, dns_name=name
    )


def dns(name: str) -> NetworkAttemptInfo:
    return NetworkAttemptInfo(
        protocol=NetProtocol.DNS, address="127.0.0.53", port=53, dns_name=name
    )


def judged(reads: list[str], network: list[NetworkAttemptInfo]) -> set[str]:
    shipped = load_bundle(default_policy_dir())
    effects = Effects(
        workspace="/w",
        home="/home/u",
        network=tuple(network),
        sensitive_reads=tuple(
            SensitiveReadInfo(path=p.replace("~", "/home/u").encode(), pid=None) for p in reads
        ),
    )
    return {f.rule_id for f in shipped.judge_effects(effects)}


def test_a_credential_used_by_its_own_tool_asks_and_anything_else_is_exfiltration() -> None:
    own = judged(["~/.npmrc"], [dns("registry.npmjs.org"), tcp("registry.npmjs.org")])
    assert "effect.exfiltration" not in own and "effect.sensitive-read" in own
    assert "effect.exfiltration" in judged(["~/.npmrc"], [tcp("evil.example")])
    assert "effect.exfiltration" in judged(
        ["~/.npmrc", "~/.ssh/id_ed25519"], [tcp("registry.npmjs.org")]
    )
    # A DNS lookup alone can carry the secret in its name: never "its own service".
    assert "effect.exfiltration" in judged(["~/.ssh/id_ed25519"], [dns("AAAA.attacker.example")])
    assert "effect.exfiltration" not in judged(
        ["~/.ssh/id_ed25519", "~/.ssh/known_hosts"], [dns("git.example"), tcp("git.example", 22)]
    )
    assert "effect.exfiltration" in judged(["~/.ssh/id_ed25519"], [tcp("git.example", 443)])
    assert "effect.exfiltration" not in judged(
        ["~/.aws/credentials", "~/.aws/config"], [tcp("sts.amazonaws.com")]
    )
    assert "effect.exfiltration" in judged(
        ["~/.aws/credentials"], [tcp("amazonaws.com.evil.example")]
    )


def local(port: int) -> NetworkAttemptInfo:
    return NetworkAttemptInfo(
        protocol=NetProtocol.TCP, address="127.0.0.1", port=port, refusal="host-service"
    )


def test_a_local_database_password_file_is_bound_to_the_local_server_by_address() -> None:
    found = judged(["~/.pgpass"], [local(5432)])
    assert "effect.exfiltration" not in found and "effect.network" in found
    assert "effect.exfiltration" in judged(["~/.pgpass"], [local(6379)])
    assert "effect.exfiltration" in judged(["~/.pgpass"], [tcp("db.evil.example", 5432)])
