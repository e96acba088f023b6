"""The schema (``data/policy.schema.json``), and its errors as problems a person can act on.

:func:`_schema_problems` turns each jsonschema error into a problem at the offending key or
value, in the policy's own words, with a hint where a common mistake explains it (an
unquoted ``yes``, a ``: `` in a plain string, a misspelt key).
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Iterable
from importlib import resources
from typing import Any

import jsonschema

from airlock.policy.loader._problems import _Problems
from airlock.policy.loader._yaml import _Doc
from airlock.policy.rules import JsonPath


@functools.cache
def _schema() -> dict[str, Any]:
    text = resources.files("airlock.policy").joinpath("data/policy.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    schema = _schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


def _describe(path: JsonPath) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or "the file"


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if value is None:
        return "nothing (null)"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "a mapping"


_TYPE_NAMES = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "boolean": "true or false",
    "integer": "an integer",
    "number": "a number",
}


_NOT_ALLOWED = {
    "match": (
        "a rule has either `match:` (a static rule) or `effect:` (an effect rule), not both",
        "split it into two rules with their own ids",
    ),
    "exceptions": (
        "an effect rule has no `exceptions:`",
        "narrow the effect instead: files.not_paths, sensitive_reads.not_paths or "
        "network.not_hosts",
    ),
}


def _literal(value: Any) -> str:
    """A YAML scalar as a policy author would write it."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _schema_problems(
    doc: _Doc, problems: _Problems, validator: jsonschema.protocols.Validator | None = None
) -> bool:
    """Validate one document against the schema (default: a policy file); True when valid."""
    validator = validator or _validator()
    errors = sorted(validator.iter_errors(doc.value), key=lambda e: list(map(str, e.path)))
    for e in errors:
        path: JsonPath = (doc.file, *e.absolute_path)
        where = _describe(tuple(e.absolute_path))
        v = e.validator
        schema: Any = e.schema
        instance: Any = e.instance
        expected: Any = e.validator_value
        if v == "additionalProperties":
            allowed = sorted(schema.get("properties", {}))
            for k in instance:
                if k not in allowed:
                    problems.add(
                        (*path, k),
                        f"unknown key {k!r} in {where}",
                        f"{_did_you_mean(k, allowed)}allowed keys: {', '.join(allowed)}",
                        key=True,
                    )
        elif v == "required":
            for k in expected:
                if k not in instance:
                    hint = (
                        "a rule has `match:` (a static rule, judged on the command line) or "
                        "`effect:` (an effect rule, judged on what the dry run did)"
                        if k == "match"
                        else ""
                    )
                    problems.add(path, f"missing required key {k!r} in {where}", hint)
        elif v == "type":
            if isinstance(expected, list):
                wanted = " or ".join(_TYPE_NAMES.get(str(x), str(x)) for x in expected)
            else:
                wanted = _TYPE_NAMES.get(str(expected), str(expected))
            hint = ""
            in_tests = "tests" in e.absolute_path
            if expected == "string" and isinstance(instance, dict):
                hint = "quote it: in a plain YAML string, ': ' starts a mapping" + (
                    " (a static rule's tests are command lines; effects are for effect rules)"
                    if in_tests
                    else ""
                )
            elif expected == "object" and in_tests and isinstance(instance, str):
                hint = (
                    "an effect rule's tests are effects (files, programs, network, "
                    "sensitive_reads), not command lines"
                )
            elif expected == "string" and not isinstance(instance, list):
                hint = (
                    "quote it: YAML reads unquoted yes/no/on/off/true/false as booleans, "
                    "digits as numbers and an empty value as null"
                )
            if not e.absolute_path:
                problems.add(
                    path,
                    f"a policy file must be a mapping, found {_kind(instance)}",
                    "start with `version: 1`",
                )
            else:
                problems.add(path, f"{where}: expected {wanted}, found {_kind(instance)}", hint)
        elif v == "enum":
            choices = [str(c) for c in expected]
            if isinstance(instance, str):
                hint = _did_you_mean(instance, choices).strip()
                if instance == "allow" and e.absolute_path[-1] == "decision":
                    hint = (
                        "an effect rule asks or denies: a dry run that no rule objects to is "
                        "ALLOW already, and an allow could not cancel another rule's ask"
                    )
                problems.add(
                    path, f"{where}: {instance!r} is not one of {', '.join(choices)}", hint
                )
            else:
                problems.add(
                    path,
                    f"{where}: expected one of {', '.join(choices)}, found {_kind(instance)}",
                    "quote it: YAML reads unquoted yes/no/on/off/true/false as booleans",
                )
        elif v == "const":
            hint = "this engine reads policy format version 1" if where == "version" else ""
            problems.add(
                path, f"{where}: must be {_literal(expected)}, found {_literal(instance)}", hint
            )
        elif v == "not":
            # The schema's way of saying "not this key here" (see the rule's if/then).
            last = e.absolute_path[-1] if e.absolute_path else ""
            message, hint = _NOT_ALLOWED.get(
                str(last), (f"{where} is not allowed here", "remove it")
            )
            problems.add(path, message, hint, key=True)
        elif v == "pattern":
            last = e.absolute_path[-1] if e.absolute_path else ""
            if last == "id":
                problems.add(
                    path,
                    f"invalid rule id {instance!r}",
                    "ids are lowercase letters, digits, '.', '_' and '-', starting with a letter "
                    "or digit, e.g. fs.rm-recursive-system",
                )
            elif last == "title":
                problems.add(path, f"{where}: the title must be one line", "")
            elif last == "expires":
                problems.add(path, f"{where}: invalid date {instance!r}", "write YYYY-MM-DD")
            elif last in ("mode", "mode_before"):
                problems.add(
                    path,
                    f"{where}: invalid mode {instance!r}",
                    'write the permission bits in octal, quoted: "4755"',
                )
            elif len(e.absolute_path) == 1 and last in ("lists", "macros"):
                problems.add(
                    (*path, str(instance)),
                    f"invalid {str(last)[:-1]} name {instance!r}",
                    "names are letters, digits, '_' and '-', starting with a letter or '_'",
                    key=True,
                )
            else:
                problems.add(
                    path,
                    f"{where}: invalid name {instance!r}",
                    "names are letters, digits, '_' and '-', starting with a letter or '_'",
                )
        elif v == "minProperties":
            allowed = sorted(schema.get("properties", {}))
            problems.add(
                path,
                f"{where}: must not be empty",
                f"give at least one of: {', '.join(allowed)}",
            )
        elif v in ("minItems", "minLength"):
            problems.add(path, f"{where}: must not be empty", "")
        else:
            problems.add(path, f"{where}: {e.message}", "")
    return not errors


@functools.cache
def _effects_validator() -> jsonschema.protocols.Validator:
    schema = _schema()
    sub_schema = {"$schema": schema["$schema"], "$defs": schema["$defs"]}
    sub_schema["$ref"] = "#/$defs/effectTest"
    validator: jsonschema.protocols.Validator = jsonschema.validators.validator_for(schema)(
        sub_schema
    )
    return validator
