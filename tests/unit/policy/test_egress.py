"""Egress grants: the policy keys (schema, lint, compile, presets), the decisions they make
(airlock.egress), effect rules over forwarded and refused attempts, and the summary."""

from __future__ import annotations

import ipaddress
import json
import shutil
import textwrap
from pathlib import Path

import pytest

from airlock.api import convert
from airlock.cli.main import main
from airlock.egress import EgressPolicy, EgressRule, special_address, suggestion
from airlock.policy.loader import PolicyBundle, PolicyError, load_bundle
from airlock.policy.store import default_policy_dir
from airlock.policy.summary import summarize
from airlock.sandbox import _wire
from airlock.types import Effects, NetProtocol, NetworkAttemptInfo, Termination, Validation, Verdict


def bundle(tmp_path: Path, text: str, name: str = "p.yaml") -> PolicyBundle:
    (tmp_path / name).write_text(textwrap.dedent(text))
    return load_bundle(tmp_path)


def problems(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "p.yaml").write_text(textwrap.dedent(text))
    with pytest.raises(PolicyError) as e:
        load_bundle(tmp_path)
    return [f"{p.line}:{p.message}" for p in e.value.problems]


POLICY = """\
version: 1
egress_presets:
  regs:
    description: test registries
    allow:
      - {hosts: [pypi.org, "*.pythonhosted.org"], ports: [443]}
      - {name: apt, hosts: [deb.debian.org], ports: [80, 443]}
egress:
  dry_run:
    presets: [regs]
    allow:
      - {hosts: [Example.COM.], ports: [443, "8000-8001"], cidrs: [10.20.0.0/16]}
    deny:
      - {hosts: [upload.pypi.org]}
      - {hosts: ["*"], ports: [25]}
      - {cidrs: [10.20.99.0/24]}
"""


def test_grants_compile_per_mode_with_presets_and_labels(tmp_path: Path) -> None:
    b = bundle(tmp_path, POLICY)
    e = b.egress_dry_run
    assert e.enabled and not b.egress_execute.enabled
    assert [r.label for r in e.allow] == ["regs", "regs/apt", "p.yaml:12"]
    assert e.allow[2].hosts == ("example.com",) and e.allow[2].cidrs == ("10.20.0.0/16",)
    assert e.allow[2].ports == ((443, 443), (8000, 8001))
    assert b.egress_presets == (("regs", "test registries"),)
    decide = e.connection
    assert decide("pypi.org", "", 443).grant == "regs"
    assert decide("a.b.files.pythonhosted.org", "", 443).grant == "regs"
    assert decide("pythonhosted.org", "", 443).refusal == "no-grant"  # *. is below only
    assert decide("pypi.org", "", 80).refusal == "no-grant"
    assert decide("EXAMPLE.com.", "", 8001).grant == "p.yaml:12"
    assert decide("", "10.20.1.2", 443).grant == "p.yaml:12"  # a literal address, by CIDR
    assert decide("", "10.20.99.1", 443).refusal == "denied"  # deny wins
    denied = decide("upload.pypi.org", "", 443)
    assert (denied.refusal, denied.detail) == (
        "denied",
        "upload.pypi.org:443 is denied (p.yaml:14)",
    )
    assert decide("deb.debian.org", "", 25).refusal == "denied"
    assert e.lookup("upload.pypi.org").refusal == "denied"  # a deny without ports: the name too
    assert e.lookup("deb.debian.org").grant == "regs/apt"
    assert e.lookup("nowhere.example").refusal == "no-grant"
    # Compiled grants travel to the supervisor in its restricted message format.
    assert _wire.loads(_wire.dumps(e)[8:]) == e


def test_upstream_addresses_need_a_cidr_grant_unless_public(tmp_path: Path) -> None:
    e = bundle(tmp_path, POLICY).egress_dry_run
    assert e.upstream("151.101.0.223", 443).allowed
    for address, words in (
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "metadata"),
        ("10.1.2.3", "private"),
        ("100.64.0.1", "private or special"),
        ("198.18.0.7", "private or special"),  # the sandbox's own placeholder answers
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("::ffff:169.254.169.254", "embeds 169.254.169.254"),
        ("64:ff9b::7f00:1", "embeds 127.0.0.1"),
        ("2002:a9fe:a9fe::1", "embeds 169.254.169.254"),
        ("224.0.0.1", "not a unicast"),
    ):
        d = e.upstream(address, 443)
        assert (d.refusal, words in d.detail) == ("address", True), (address, d)
    assert e.upstream("10.20.3.4", 443).allowed  # the CIDR grant names it
    assert e.upstream("10.20.3.4", 22).refusal == "address"  # not on that port
    assert e.upstream("10.20.99.4", 443).refusal == "denied"
    host = [ipaddress.ip_network("93.184.216.0/24")]  # a host with a public address
    assert "host's own network" in special_address(ipaddress.ip_address("93.184.216.9"), host)
    assert e.upstream("93.184.216.9", 443, host).refusal == "address"
    assert e.upstream("93.184.216.9", 443).allowed


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('{hosts: ["*"], ports: [1]}', "a grant of every name ('*')"),
        ('{hosts: ["a*b.com"], ports: [1]}', "'*' may only begin a pattern"),
        ('{hosts: ["*.com"], ports: [1]}', "covers a whole top-level domain"),
        ('{hosts: ["https://x.org/"], ports: [1]}', "is not a DNS name"),
        ('{hosts: ["10.0.0.1"], ports: [1]}', "is an address"),
        ("{ports: [443]}", "names neither hosts nor cidrs"),
        ('{cidrs: ["10.0.0.1/8"], ports: [1]}', "has host bits set"),
        ('{hosts: [x.org], ports: ["9-3"]}', "invalid port or port range '9-3'"),
    ],
)
def test_lint_names_the_bad_entry(tmp_path: Path, entry: str, message: str) -> None:
    got = problems(tmp_path, f"version: 1\negress:\n  dry_run:\n    allow:\n      - {entry}\n")
    assert len(got) == 1 and got[0].startswith("5:") and message in got[0], got


def test_unknown_and_duplicate_presets_and_schema_errors(tmp_path: Path) -> None:
    got = problems(tmp_path, "version: 1\negress: {dry_run: {presets: [nope]}}\n")
    assert got == ["2:unknown egress preset 'nope'"] or "unknown egress preset 'nope'" in got[0], (
        got
    )
    preset = "version: 1\negress_presets: {nope: {description: x, allow: [%s]}}\n"
    (tmp_path / "q.yaml").write_text(preset % "{hosts: [a.b], ports: [1]}")
    (tmp_path / "r.yaml").write_text(preset % "{hosts: [c.d], ports: [1]}")
    with pytest.raises(PolicyError) as e:
        load_bundle(tmp_path)
    assert any(
        "egress preset 'nope' is already defined at q.yaml:2" in p.message for p in e.value.problems
    )
    for f in ("q.yaml", "r.yaml"):
        (tmp_path / f).unlink()
    got = problems(tmp_path, "version: 1\negress: {dry_run: {allow: [{hosts: [a.b]}]}}\n")
    assert "'ports' is a required property" in " ".join(got) or "ports" in got[0], got
    got = problems(tmp_path, "version: 1\negress: {dryrun: {}}\n")
    assert got == ["2:unknown key 'dryrun' in egress"], got


def test_execute_grants_load_apart_from_the_dry_run_s(tmp_path: Path) -> None:
    b = bundle(
        tmp_path, "version: 1\negress: {execute: {allow: [{hosts: [x.org], ports: [443]}]}}\n"
    )
    assert b.egress_execute.enabled and not b.egress_dry_run.enabled
    assert b.egress_execute.connection("x.org", "198.18.0.1", 443).allowed
    assert not b.egress_dry_run.connection("x.org", "198.18.0.1", 443).allowed
    assert b.warnings == ()


def test_the_shipped_preset_is_off_until_switched_on_in_one_line(tmp_path: Path) -> None:
    shipped = load_bundle(default_policy_dir())
    assert not shipped.egress_dry_run.enabled and not shipped.egress_execute.enabled
    assert [name for name, _ in shipped.egress_presets] == ["package-registries"]
    shutil.copytree(default_policy_dir(), tmp_path / "default")
    (tmp_path / "on.yaml").write_text(
        "version: 1\negress: {dry_run: {presets: [package-registries]}}\n"
    )
    e = load_bundle(tmp_path).egress_dry_run
    for name, port in (
        ("pypi.org", 443),
        ("files.pythonhosted.org", 443),
        ("registry.npmjs.org", 443),
        ("static.crates.io", 443),
        ("proxy.golang.org", 443),
        ("rubygems.org", 443),
        ("deb.debian.org", 80),
        ("de.archive.ubuntu.com", 80),
        ("github.com", 443),
        ("codeload.github.com", 443),
    ):
        assert e.connection(name, "", port).grant.startswith("package-registries/"), name
    for name, port in (("upload.pypi.org", 443), ("api.github.com", 443), ("pypi.org", 80)):
        assert e.connection(name, "", port).refusal == "no-grant", name


def attempt(**kw: object) -> NetworkAttemptInfo:
    base: dict[str, object] = {"protocol": NetProtocol.TCP, "address": "198.18.0.1", "port": 443}
    return NetworkAttemptInfo(**{**base, **kw})  # type: ignore[arg-type]


def test_effect_rules_see_forwarded_blocked_grants_and_refusals(tmp_path: Path) -> None:
    b = bundle(
        tmp_path,
        """\
        version: 1
        rules:
          - id: t.blocked
            title: Blocked
            description: x
            decision: ask
            severity: low
            effect: {network: {blocked: true}}
            tests:
              match: [{network: [{dns_name: a.b}]}]
              not_match: [{network: [{dns_name: a.b, forwarded: true, grant: g}]}]
          - id: t.cut
            title: Cut uploads from a registry
            description: x
            decision: deny
            severity: high
            effect: {network: {forwarded: true, grants: ["package-*"], refusals: [upload-cap]}}
            tests:
              match:
                - network: [{forwarded: true, grant: package-registries/pypi, refusal: upload-cap}]
              not_match: [{network: [{forwarded: true, grant: package-registries/pypi}]}]
        """,
    )
    judge = b.judge_effects
    ok = attempt(dns_name="pypi.org", forwarded=True, grant="package-registries/pypi")
    lookup = attempt(protocol=NetProtocol.DNS, dns_name="pypi.org", grant="package-registries/pypi")
    cut = attempt(
        dns_name="pypi.org", forwarded=True, grant="package-registries/pypi", refusal="upload-cap"
    )
    old = attempt(dns_name="x.example")  # no egress fields at all: blocked, as before egress

    def fired(*net: NetworkAttemptInfo) -> list[str]:
        return [f.rule_id for f in judge(Effects("/w", "/h", network=net))]

    assert fired(ok, lookup) == []
    assert fired(old) == ["t.blocked"]
    assert fired(cut) == ["t.cut", "t.blocked"]
    message = judge(Effects("/w", "/h", network=(cut,)))[0].message
    assert message == "Cut uploads from a registry: tcp pypi.org:443 (cut: upload-cap)"


def test_the_default_policy_judges_forwarded_fetches_as_nothing(tmp_path: Path) -> None:
    default = load_bundle(default_policy_dir())
    ok = attempt(dns_name="pypi.org", forwarded=True, grant="package-registries/pypi")
    assert default.judge_effects(Effects("/w", "/h", network=(ok,))) == ()
    after = attempt(dns_name="pypi.org", grant="package-registries/pypi", refusal="sensitive-read")
    e = Effects("/w", "/h", network=(ok, after), sensitive_reads=())
    assert [f.rule_id for f in default.judge_effects(e)] == ["effect.network"]


def test_summary_under_egress_says_what_was_downloaded_and_refused() -> None:
    network = (
        attempt(
            protocol=NetProtocol.DNS,
            dns_name="pypi.org",
            grant="regs",
            address="10.0.0.53",
            port=53,
        ),
        attempt(dns_name="pypi.org", forwarded=True, grant="regs", bytes_received=1500),
        attempt(dns_name="pypi.org", forwarded=True, grant="regs", bytes_received=2 << 20),
        attempt(dns_name="evil.example", refusal="no-grant"),
        attempt(dns_name="evil.example", port=80, refusal="no-grant"),
        attempt(
            dns_name="loop.test",
            refusal="address",
            refusal_detail="127.0.0.1 is a loopback address",
        ),
        attempt(dns_name="pypi.org", refusal="sensitive-read", grant="regs"),
        attempt(
            protocol=NetProtocol.UDP, dns_name="pypi.org", port=443, grant="regs", refusal="udp"
        ),
    )
    text = summarize(
        changes=(),
        changes_truncated=False,
        termination=Termination.EXITED,
        exit_code=0,
        signal=0,
        timeout_s=30,
        workspace="/w",
        network=network,
        egress=True,
    )
    assert "Downloaded 2 MiB from pypi.org over 2 connections (egress grant regs)." in text
    assert (
        "Refused evil.example:443, evil.example:80 (no egress grant; `{hosts: [evil.example], "
        "ports: [443]}` under egress.dry_run.allow would allow evil.example:443)."
    ) in text
    assert (
        "Refused loop.test:443 (the name resolves to a loopback, private, link-local or host"
        in text
    )
    assert "127.0.0.1 is a loopback address; only an allow entry's cidrs can grant" in text
    assert "Refused pypi.org:443 (after a sensitive read nothing is forwarded)." in text
    assert "Refused pypi.org:443 (UDP is never forwarded)." in text
    assert "Tried to reach" not in text
    assert suggestion("", "203.0.113.7", 22) == "{cidrs: [203.0.113.7/32], ports: [22]}"


def test_attempts_survive_protobuf_with_their_egress_fields() -> None:
    a = attempt(
        dns_name="pypi.org",
        forwarded=True,
        grant="regs",
        refusal="upload-cap",
        refusal_detail="more than 65536 bytes sent on one connection",
        bytes_received=123456,
        upstream_address="151.101.0.223",
    )
    v = Validation(validation_id="x", verdict=Verdict.ALLOW, summary="", network_attempts=(a,))
    assert convert.validation_from_proto(convert.validation_to_proto(v)).network_attempts == (a,)


def test_rules_compare_equal_across_loads_and_ignore_duplicate_entries(tmp_path: Path) -> None:
    text = "version: 1\negress: {dry_run: {allow: [{hosts: [a.org, a.org], ports: [443, 443]}]}}\n"
    e = bundle(tmp_path, text).egress_dry_run
    assert e.allow == (EgressRule(hosts=("a.org",), ports=((443, 443),), label="p.yaml:2"),)
    assert EgressPolicy().enabled is False


def test_policy_explain_shows_what_each_mode_may_reach(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    assert main(["policy", "explain", "--policy", str(tmp_path), "--", "ls"]) == 0
    out = capsys.readouterr().out
    assert "egress (dry run):\n  allow pypi.org *.pythonhosted.org port 443 (regs)\n" in out
    assert "  allow example.com 10.20.0.0/16 port 443,8000-8001 (p.yaml:12)\n" in out
    assert "  deny upload.pypi.org port any (p.yaml:14)\n" in out
    assert "egress (execute): nothing granted\n" in out
    assert "egress presets defined (switched on with egress.MODE.presets): regs" in out
    assert main(["policy", "explain", "--policy", str(tmp_path), "--json", "--", "ls"]) == 0
    egress = json.loads(capsys.readouterr().out)["policy"]["egress"]
    assert egress["dry_run"]["allow"][2] == {
        "grant": "p.yaml:12",
        "hosts": ["example.com"],
        "ports": [443, "8000-8001"],
        "cidrs": ["10.20.0.0/16"],
    }
    assert egress["presets"] == {"regs": "test registries"}


def test_the_cli_table_says_what_became_of_each_attempt() -> None:
    from rich.console import Console

    from airlock.cli.render import network_table

    attempts = (
        attempt(
            dns_name="pypi.org",
            forwarded=True,
            grant="regs",
            bytes_sent=900,
            bytes_received=3 << 20,
        ),
        attempt(
            dns_name="pypi.org",
            forwarded=True,
            grant="regs",
            refusal="upload-cap",
            bytes_sent=70000,
        ),
        attempt(dns_name="evil.example", refusal="no-grant"),
        attempt(dns_name="loop.test", grant="regs", refusal="address"),
    )
    console = Console(width=200, record=True)
    console.print(network_table(attempts, 0))
    text = console.export_text()
    assert "Network attempts: 4 (2 forwarded by egress grants)" in text
    assert "forwarded (regs) ↑900 B ↓3 MiB" in text
    assert "forwarded (regs) ↑68.4 KiB ↓0 B, cut: upload-cap" in text
    assert "blocked" in text and "refused: address" in text
    console = Console(width=200, record=True)
    console.print(network_table(attempts[2:3], 0))  # no egress: the table as before
    assert "(all blocked)" in console.export_text() and "egress" not in console.export_text()
