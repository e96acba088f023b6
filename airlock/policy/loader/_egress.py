"""Egress: the bundle's ``egress`` and ``egress_presets`` keys become one
:class:`~airlock.egress.EgressPolicy` per mode (dry run, Execute).

Every file may add allow and deny entries and switch presets on; the bundle uses the union.
Presets are defined once in the bundle (like lists and macros) and grant nothing until a
mode names them. Problems name the offending value: an unknown preset, a host pattern that
is not a DNS name, a network with host bits set, an entry with neither hosts nor cidrs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from airlock.egress import EgressPolicy, EgressRule, host_pattern_problem
from airlock.policy.loader._presets import read_presets, where
from airlock.policy.loader._problems import _Problems
from airlock.policy.loader._yaml import _Doc
from airlock.policy.rules import JsonPath

MODES = ("dry_run", "execute")


@dataclass(frozen=True)
class EgressPreset:
    name: str
    description: str
    rules: tuple[EgressRule, ...]
    where: str  # FILE:LINE of its definition


@dataclass
class _Mode:
    allow: list[EgressRule] = field(default_factory=list)
    deny: list[EgressRule] = field(default_factory=list)
    presets: list[str] = field(default_factory=list)

    def policy(self) -> EgressPolicy:
        return EgressPolicy(tuple(dict.fromkeys(self.allow)), tuple(dict.fromkeys(self.deny)))


def _ports(
    values: Sequence[int | str], path: JsonPath, problems: _Problems
) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i, value in enumerate(values):
        if isinstance(value, int):
            out.append((value, value))  # the schema bounds it
            continue
        m = re.fullmatch(r"([0-9]{1,5})(?:-([0-9]{1,5}))?", value.strip())
        lo = int(m.group(1)) if m else -1
        hi = int(m.group(2) or m.group(1)) if m else -1
        if m is None or not (1 <= lo <= hi <= 65535):
            problems.add(
                (*path, i),
                f"invalid port or port range {value!r}",
                'write a port number (1-65535) or an inclusive range like "8000-8999"',
            )
            continue
        out.append((lo, hi))
    return out


def _cidrs(values: Sequence[str], path: JsonPath, problems: _Problems) -> list[str]:
    out: list[str] = []
    for i, text in enumerate(values):
        try:
            out.append(str(ipaddress.ip_network(text, strict=True)))
        except ValueError as e:
            hint = "write a network as ADDRESS/PREFIX (e.g. 10.0.0.0/8) or a single address"
            if "host bits set" in str(e):
                hint = "bits are set beyond the prefix: write the network's first address"
            problems.add((*path, i), f"invalid network {text!r}: {e}", hint)
    return out


def _rule(
    raw: dict[str, Any], path: JsonPath, problems: _Problems, *, deny: bool, label: str
) -> EgressRule | None:
    before = len(problems.errors)
    if "hosts" not in raw and "cidrs" not in raw:
        problems.add(
            path,
            f"an egress {'deny' if deny else 'allow'} entry names neither hosts nor cidrs",
            "add hosts: [NAME, ...] or cidrs: [NETWORK, ...]",
        )
    hosts: list[str] = []
    for i, pattern in enumerate(raw.get("hosts", ())):
        problem = host_pattern_problem(pattern, deny=deny)
        if problem is not None:
            problems.add((*path, "hosts", i), *problem)
        else:
            hosts.append(pattern.rstrip(".").lower())
    ports = _ports(raw.get("ports", ()), (*path, "ports"), problems)
    cidrs = _cidrs(raw.get("cidrs", ()), (*path, "cidrs"), problems)
    if len(problems.errors) > before:
        return None
    return EgressRule(
        hosts=tuple(dict.fromkeys(hosts)),
        ports=tuple(dict.fromkeys(ports)),
        cidrs=tuple(dict.fromkeys(cidrs)),
        label=raw.get("name", label),
    )


def _presets(docs: Sequence[_Doc], problems: _Problems) -> dict[str, EgressPreset]:
    def build(name: str, raw: dict[str, Any], path: JsonPath, at: str) -> EgressPreset:
        compiled = [
            _rule(entry, (*path, "allow", i), problems, deny=False, label=name)
            for i, entry in enumerate(raw["allow"])
        ]
        # A preset's entries are reported as PRESET or PRESET/NAME.
        rules = [
            dataclasses.replace(r, label=name if r.label == name else f"{name}/{r.label}")
            for r in compiled
            if r is not None
        ]
        return EgressPreset(name, raw["description"], tuple(rules), at)

    return read_presets(docs, "egress_presets", "egress", problems, build)


def compile_egress(
    docs: Sequence[_Doc], problems: _Problems
) -> tuple[EgressPolicy, EgressPolicy, dict[str, EgressPreset]]:
    """(dry run, Execute) egress of the bundle, and its presets by name."""
    presets = _presets(docs, problems)
    modes = {m: _Mode() for m in MODES}
    for doc in docs:
        egress: dict[str, Any] = doc.value.get("egress", {})
        for mode_name, raw in egress.items():
            mode = modes[mode_name]
            path: JsonPath = (doc.file, "egress", mode_name)
            for i, name in enumerate(raw.get("presets", ())):
                preset = presets.get(name)
                if preset is None:
                    defined = ", ".join(sorted(presets)) or "none"
                    problems.add(
                        (*path, "presets", i),
                        f"unknown egress preset {name!r}",
                        f"defined presets: {defined} (the shipped ones are in the default "
                        "policy's egress.yaml: copy it into your policy directory)",
                    )
                    continue
                mode.allow.extend(preset.rules)
                mode.presets.append(name)
            for i, entry in enumerate(raw.get("allow", ())):
                epath: JsonPath = (*path, "allow", i)
                rule = _rule(entry, epath, problems, deny=False, label=where(problems, epath))
                if rule is not None:
                    mode.allow.append(rule)
            for i, entry in enumerate(raw.get("deny", ())):
                epath = (*path, "deny", i)
                rule = _rule(entry, epath, problems, deny=True, label=where(problems, epath))
                if rule is not None:
                    mode.deny.append(rule)
    return modes["dry_run"].policy(), modes["execute"].policy(), presets
