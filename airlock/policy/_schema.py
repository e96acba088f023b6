"""The schema (``data/policy.schema.json``), and its errors as problems a person can act on.

:func:`_schema_problems` turns each jsonschema error into a problem at the offending key or
value, in the policy's own words, with a hint where a common mistake explains it (an
unquoted ``yes``, a ``: `` in a plain string, a misspelt key).

``jsonschema`` is imported only when a validator is first built: with its validators it is
7 MiB resident, for a check made only while a policy loads. The daemon makes that check in a
short-lived child process (:func:`check_in_child`, which runs this module), so that it never
imports ``jsonschema`` itself; ``airlock policy`` and the tests check in process
(:func:`check_in_process`). Both give the same problems for the same documents.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import jsonschema

# A value's place in a file: its name, then keys and indexes (as ``rules.JsonPath``; this
# module imports no other of the policy's, so that the child starts in ~0.1 s).
JsonPath = tuple[str | int, ...]

# One document to check: "policy" (a policy file) or "effects" (an effects file), its file name
# and its parsed value. A check gives, per document, whether the schema takes it and the
# problems it found.
SchemaDoc = tuple[str, str, Any]
Added = tuple[JsonPath, str, str, bool]  # path, message, hint, key
Checked = tuple[bool, list[Added]]
SchemaCheck = Callable[[Sequence[SchemaDoc]], list[Checked]]
# A child that does not answer within this long fails the load (the check itself takes ~0.1 s).
CHILD_TIMEOUT_S = 60.0
_CHILD_OUTPUT_MAX = 16 * 1024 * 1024


@functools.cache
def _schema() -> dict[str, Any]:
    text = resources.files("airlock.policy").joinpath("data/policy.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    import jsonschema

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


class _Adds(Protocol):
    def add(self, path: JsonPath, message: str, hint: str = "", *, key: bool = False) -> None: ...


class _Once:
    """Passes each distinct problem on to ``problems`` once."""

    def __init__(self, problems: _Adds) -> None:
        self.problems = problems
        self.seen: set[tuple[JsonPath, str, str, bool]] = set()

    def add(self, path: JsonPath, message: str, hint: str = "", *, key: bool = False) -> None:
        if (path, message, hint, key) not in self.seen:
            self.seen.add((path, message, hint, key))
            self.problems.add(path, message, hint, key=key)


def _schema_problems(
    file: str, value: Any, problems: _Adds, validator: jsonschema.protocols.Validator | None = None
) -> bool:
    """Validate one document (``file``'s parsed ``value``) against the schema (default: a
    policy file); True when valid."""
    validator = validator or _validator()
    errors = sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.path)))
    # jsonschema reports a failure once per schema branch that checks it (a rule's keys are
    # required by several if/then and allOf parts): each problem is reported once.
    problems = _Once(problems)
    for e in errors:
        path: JsonPath = (file, *e.absolute_path)
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
    import jsonschema

    schema = _schema()
    sub_schema = {"$schema": schema["$schema"], "$defs": schema["$defs"]}
    sub_schema["$ref"] = "#/$defs/effectTest"
    validator: jsonschema.protocols.Validator = jsonschema.validators.validator_for(schema)(
        sub_schema
    )
    return validator


class _Recorder:
    """What :func:`_schema_problems` adds, kept as data (the child's answer)."""

    def __init__(self) -> None:
        self.added: list[Added] = []

    def add(self, path: JsonPath, message: str, hint: str = "", *, key: bool = False) -> None:
        self.added.append((path, message, hint, key))


def check_in_process(docs: Sequence[SchemaDoc]) -> list[Checked]:
    """Check each document against its schema here (imports ``jsonschema``)."""
    out: list[Checked] = []
    for kind, file, value in docs:
        recorder = _Recorder()
        validator = _effects_validator() if kind == "effects" else _validator()
        valid = _schema_problems(file, value, recorder, validator)
        out.append((valid, recorder.added))
    return out


def check_in_child(docs: Sequence[SchemaDoc]) -> list[Checked]:
    """:func:`check_in_process` in a new interpreter (this module run as a program), so that
    this process never imports ``jsonschema``. Raises OSError when the child fails, answers
    late, or answers something else than one list of problems per document: the caller fails
    the load (a policy that was not checked is not used)."""
    try:
        request = json.dumps([[kind, file, value] for kind, file, value in docs])
    except (TypeError, ValueError) as exc:  # a value YAML's safe loading never gives
        raise OSError(f"the files cannot be sent to the schema check: {exc}") from None
    try:
        done = subprocess.run(  # exec: safe from a threaded process
            [sys.executable, "-m", "airlock.policy._schema"],
            input=request.encode(),
            capture_output=True,
            timeout=CHILD_TIMEOUT_S,
            env=_child_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise OSError(f"the schema check did not answer within {CHILD_TIMEOUT_S:g} s") from None
    if done.returncode != 0 or len(done.stdout) > _CHILD_OUTPUT_MAX:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise OSError(f"the schema check failed (exit {done.returncode}): {' '.join(tail)}")
    try:
        out: list[Checked] = [
            (
                valid is True,
                [(tuple(path), str(msg), str(hint), bool(key)) for path, msg, hint, key in added],
            )
            for valid, added in json.loads(done.stdout)
        ]
    except (ValueError, TypeError) as exc:
        raise OSError(f"the schema check answered something else: {exc}") from None
    if len(out) != len(docs):
        raise OSError("the schema check answered for another number of documents")
    return out


def _child_env() -> dict[str, str]:
    """The child imports the same ``airlock`` as this process: the interpreter's own paths,
    and ``PYTHONPATH`` when this process was given one."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def _main() -> int:
    """The child: documents (JSON) on stdin, their problems (JSON) on stdout."""
    docs = [(str(kind), str(file), value) for kind, file, value in json.load(sys.stdin)]
    json.dump(
        [[valid, [list(a) for a in added]] for valid, added in check_in_process(docs)], sys.stdout
    )
    return 0


if __name__ == "__main__":
    sys.exit(_main())
