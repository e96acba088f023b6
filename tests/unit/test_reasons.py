"""The catalog of error reasons (airlock/_reasons.py) against the code, the docs and the proto.

The proto promises that reasons are stable, so there is one list of them, ``Reason``, and this
test keeps everything else in step with it:

* every reason the code names is in the catalog: a ``reason=`` keyword argument (a string,
  ``Reason.X`` or either branch of a conditional), a positional reason given to an error-making
  helper (a function with a ``reason`` parameter that returns an error class, such as the
  engine's ``_fail``) and that parameter's default, a ``default_reason`` of a class, any
  ``Reason.X``, and a string compared with a ``.reason``;
* every member of the catalog is used somewhere (no dead entries); the gRPC code names count as
  used when the client makes a reason of a code's name (``reason=code.name``), and then every
  code gRPC can report is in the catalog;
* docs/errors.md has one row for exactly each member, listing at least the status code of every
  class the code raises it with;
* the list at the top of proto/airlock/v1/sandbox.proto names exactly the members.

Each check is a function returning its problems; the ``test_checks_catch_*`` tests feed each one
a broken input, so a check that cannot fail shows up as a failing test.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from airlock import _errors
from airlock._errors import AirlockError, Reason
from airlock.api import status
from airlock.api.status import from_rpc_error, status_code_of

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "airlock"
DOCS = ROOT / "docs" / "errors.md"
PROTO = ROOT / "proto" / "airlock" / "v1" / "sandbox.proto"
CATALOG = frozenset(member.value for member in Reason)
GRPC_CODE_NAMES = frozenset(c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK)
# The gRPC code of each class of airlock._errors, by class name.
CODE_OF_ERROR_CLASS = {
    name: status_code_of(cls("probe")).name
    for name, cls in vars(_errors).items()
    if isinstance(cls, type) and issubclass(cls, AirlockError)
}
# Reasons api/status.py maps to a code of their own (when their class's code is UNKNOWN).
CODE_OF_REASON = {reason: code.name for reason, code in status._CODE_OF_REASON.items()}


@dataclass(frozen=True)
class Use:
    """One place that names a reason."""

    reason: str
    where: str  # "airlock/core/state.py:123"
    how: str  # "reason=", "helper", "default_reason", "Reason.X", "compared"
    error_class: str | None = None  # the class it is raised with, when the code says


@dataclass
class Scan:
    """What the modules say about reasons."""

    uses: list[Use] = field(default_factory=list)
    # True when some call passes ``reason=<x>.name``: the client's reason for a status that
    # gRPC made itself is the code's name.
    code_names_as_reasons: bool = False
    # Every class defined in the package, with the names of its bases.
    bases: dict[str, list[str]] = field(default_factory=dict)


def _name_of(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a string annotation
        return node.value
    return None


def _is_reason_enum(node: ast.expr) -> bool:
    return _name_of(node) == "Reason"


def _named(node: ast.expr | None) -> list[str]:
    """The reasons an expression names: a string, ``Reason.X``, either branch of ``a if c
    else b``, the operands of ``a or b``. A reason computed at run time names none."""
    if node is None:
        return []
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Attribute) and _is_reason_enum(node.value):
        return [node.attr]
    if isinstance(node, ast.IfExp):
        return _named(node.body) + _named(node.orelse)
    if isinstance(node, ast.BoolOp):
        return [r for value in node.values for r in _named(value)]
    return []


def _compared(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [r for element in node.elts for r in _named(element)]
    return _named(node)


def _is_reason_attribute(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "reason"


def _helpers(tree: ast.Module) -> dict[str, tuple[int, str | None]]:
    """Error-making helpers of a module: name -> (index of the positional ``reason``, class).

    A helper is a function with a ``reason`` parameter whose return annotation names a class;
    a method's index does not count ``self`` or ``cls``.
    """
    found: dict[str, tuple[int, str | None]] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.returns is None:
            continue
        params = [a.arg for a in (*node.args.posonlyargs, *node.args.args)]
        if "reason" not in params:
            continue
        index = params.index("reason")
        if params and params[0] in ("self", "cls"):
            index -= 1
        found[node.name] = (index, _name_of(node.returns))
    return found


def scan_module(source: str, where: str, scan: Scan | None = None) -> Scan:
    """Add to ``scan`` (a new one if None) what the module ``source`` says about reasons."""
    scan = scan if scan is not None else Scan()
    tree = ast.parse(source)
    helpers = _helpers(tree)

    def use(node: ast.AST, reasons: Iterable[str], how: str, cls: str | None = None) -> None:
        line = getattr(node, "lineno", 0)
        scan.uses.extend(Use(r, f"{where}:{line}", how, cls) for r in reasons)

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            scan.bases[node.name] = [b for b in map(_name_of, node.bases) if b is not None]
            for stmt in node.body:
                target, value = None, None
                if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                    target, value = stmt.targets[0], stmt.value
                elif isinstance(stmt, ast.AnnAssign):
                    target, value = stmt.target, stmt.value
                if isinstance(target, ast.Name) and target.id == "default_reason":
                    use(stmt, _named(value), "default_reason", node.name)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in helpers:
            # The default of a helper's reason parameter.
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            first = len(positional) - len(args.defaults)
            defaults = dict(zip(positional[first:], args.defaults, strict=True))
            for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
                if default is not None:
                    defaults[arg] = default
            for arg, default in defaults.items():
                if arg.arg == "reason":
                    use(default, _named(default), "helper", helpers[node.name][1])
        elif isinstance(node, ast.Call):
            callee = _name_of(node.func)
            helper = helpers.get(callee or "")
            cls = helper[1] if helper else callee
            for keyword in node.keywords:
                if keyword.arg != "reason":
                    continue
                use(keyword, _named(keyword.value), "reason=", cls)
                if isinstance(keyword.value, ast.Attribute) and keyword.value.attr == "name":
                    scan.code_names_as_reasons = True
            if helper and len(node.args) > helper[0] >= 0:
                use(node, _named(node.args[helper[0]]), "helper", cls)
        elif isinstance(node, ast.Attribute) and _is_reason_enum(node.value):
            use(node, [node.attr], "Reason.X")
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_reason_attribute(o) for o in operands):
                others = [o for o in operands if not _is_reason_attribute(o)]
                use(node, [r for o in others for r in _compared(o)], "compared")
    return scan


def scan_package() -> Scan:
    scan = Scan()
    for path in sorted(PACKAGE.rglob("*.py")):
        scan_module(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)), scan)
    return scan


# --- The checks -------------------------------------------------------------------------------


def reason_uses(scan: Scan) -> list[Use]:
    """The uses that name error reasons: a helper's only if it returns an error class (the
    policy store's ``reload(reason)`` is a reason to reload, not an error's)."""
    return [u for u in scan.uses if u.how != "helper" or _error_code(u.error_class, scan.bases)]


def check_uses(scan: Scan, catalog: frozenset[str]) -> list[str]:
    """Every reason the code names is in the catalog."""
    return [
        f"{u.where}: {u.how} names {u.reason!r}, which is not in the catalog (airlock/_reasons.py)"
        for u in reason_uses(scan)
        if u.reason not in catalog
    ]


def used_reasons(scan: Scan) -> set[str]:
    used = {u.reason for u in reason_uses(scan)}
    if scan.code_names_as_reasons:
        used |= GRPC_CODE_NAMES
    return used


def check_dead_entries(scan: Scan, catalog: frozenset[str]) -> list[str]:
    """Every member of the catalog is used somewhere."""
    return [
        f"Reason.{reason} is used nowhere in airlock/: remove it or use it"
        for reason in sorted(catalog - used_reasons(scan))
    ]


def check_code_names(scan: Scan, catalog: frozenset[str]) -> list[str]:
    """When the client makes reasons of code names, every code gRPC can report is listed."""
    if not scan.code_names_as_reasons:
        return []
    return [
        f"the client may report the gRPC code {name} as a reason; add it to the catalog"
        for name in sorted(GRPC_CODE_NAMES - catalog)
    ]


def _error_code(cls: str | None, bases: dict[str, list[str]]) -> str | None:
    """The status code of the class named ``cls`` (by its bases), None if not an error class."""
    seen: set[str] = set()
    todo = [cls] if cls else []
    while todo:
        name = todo.pop(0)
        if name in CODE_OF_ERROR_CLASS:
            return CODE_OF_ERROR_CLASS[name]
        if name not in seen:
            seen.add(name)
            todo.extend(bases.get(name, []))
    return None


def expected_codes(scan: Scan) -> dict[str, set[str]]:
    """The status codes each reason comes with, as far as the code says."""
    codes: dict[str, set[str]] = {}
    for u in reason_uses(scan):
        code = _error_code(u.error_class, scan.bases)
        if code == "UNKNOWN" and u.reason in CODE_OF_REASON:
            code = CODE_OF_REASON[u.reason]  # api/status.py gives this reason its own code
        if code is not None:
            codes.setdefault(u.reason, set()).add(code)
    if scan.code_names_as_reasons:
        for name in GRPC_CODE_NAMES:
            codes.setdefault(name, set()).add(name)
    return codes


_ROW = re.compile(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|([^|]*)\|([^|]*)\|([^|]*)\|\s*$")


def check_docs(text: str, catalog: frozenset[str], codes: dict[str, set[str]]) -> list[str]:
    """docs/errors.md: one row (reason | code | meaning | what to do) for exactly each member."""
    problems: list[str] = []
    rows: dict[str, tuple[set[str], str, str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        m = _ROW.match(line)
        if m is None:
            continue
        reason, code_cell, meaning, action = m.groups()
        if reason in rows:
            problems.append(f"docs/errors.md:{number}: {reason} has a second row")
        listed = set(re.findall(r"`([A-Z_]+)`", code_cell))
        rows[reason] = (listed, meaning.strip(), action.strip())
        if not listed:
            problems.append(f"docs/errors.md:{number}: {reason} lists no gRPC code")
        for code in sorted(listed - GRPC_CODE_NAMES):
            problems.append(f"docs/errors.md:{number}: {reason}: {code} is not a gRPC code")
        if not meaning.strip() or not action.strip():
            problems.append(f"docs/errors.md:{number}: {reason} lacks a meaning or an action")
    problems += [f"docs/errors.md has no row for {r}" for r in sorted(catalog - rows.keys())]
    problems += [
        f"docs/errors.md has a row for {r}, which is not in the catalog"
        for r in sorted(rows.keys() - catalog)
    ]
    for reason, want in sorted(codes.items()):
        if reason in rows and not want <= rows[reason][0]:
            problems.append(
                f"docs/errors.md: {reason} comes with {', '.join(sorted(want - rows[reason][0]))}"
                f" too (the code raises it so), but its row lists {sorted(rows[reason][0])}"
            )
    return problems


def proto_reasons(text: str) -> set[str] | None:
    """The reasons listed after the ``// Reasons:`` line of the proto (None: no such list)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "// Reasons:"]
    if len(starts) != 1:
        return None
    names: set[str] = set()
    for line in lines[starts[0] + 1 :]:
        if not line.startswith("//") or not line[2:].strip():
            break
        names |= set(re.findall(r"\b[A-Z][A-Z0-9_]*\b", line))
    return names


def check_proto(text: str, catalog: frozenset[str]) -> list[str]:
    """The proto's comment lists exactly the members."""
    listed = proto_reasons(text)
    if listed is None:
        return ["the proto has no (or more than one) '// Reasons:' list"]
    return [f"the proto's list of reasons lacks {r}" for r in sorted(catalog - listed)] + [
        f"the proto lists {r}, which is not in the catalog" for r in sorted(listed - catalog)
    ]


# --- The repository ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scan() -> Scan:
    return scan_package()


def test_catalog_members_are_their_names() -> None:
    for member in Reason:
        assert member.value == member.name, member
        assert re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*", member.value), member


def test_the_scan_sees_the_known_kinds_of_use(scan: Scan) -> None:
    # If the code changes shape so that the scan no longer sees a kind of use, say so here
    # rather than let every other test pass on nothing.
    hows = {u.how for u in scan.uses}
    assert {"reason=", "helper", "default_reason", "Reason.X", "compared"} <= hows
    assert scan.code_names_as_reasons
    assert any(u.reason == "INVALID_CWD" and u.how == "helper" for u in scan.uses)


def test_every_reason_used_is_in_the_catalog(scan: Scan) -> None:
    assert check_uses(scan, CATALOG) == []


def test_every_catalog_entry_is_used(scan: Scan) -> None:
    assert check_dead_entries(scan, CATALOG) == []


def test_every_grpc_code_the_client_may_report_is_in_the_catalog(scan: Scan) -> None:
    assert check_code_names(scan, CATALOG) == []


def test_docs_list_exactly_the_catalog(scan: Scan) -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert check_docs(text, CATALOG, expected_codes(scan)) == []


def test_proto_lists_exactly_the_catalog() -> None:
    assert check_proto(PROTO.read_text(encoding="utf-8"), CATALOG) == []


def test_readme_links_the_docs() -> None:
    assert "(docs/errors.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_a_reason_outside_the_catalog_is_kept_not_refused() -> None:
    # A newer daemon may send a reason this client does not list.
    assert AirlockError("m", reason="FROM_A_NEWER_DAEMON").reason == "FROM_A_NEWER_DAEMON"
    assert type(AirlockError("m").reason) is str  # a plain str, as a reason from the wire
    assert AirlockError("m").reason == Reason.UNKNOWN == "UNKNOWN"

    class Failed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.DATA_LOSS

        def details(self) -> str:
            return "lost"

    error = from_rpc_error(Failed())
    assert error.reason == "DATA_LOSS" and error.reason in CATALOG


# --- The checks can fail ----------------------------------------------------------------------

_BROKEN_MODULE = """
from airlock._errors import InvalidRequest, Reason


def _fail(field: str, why: str, reason: str = "NOT_A_REASON_1") -> InvalidRequest:
    return InvalidRequest(f"{field}: {why}", reason=reason)


class MyError(InvalidRequest):
    default_reason = "NOT_A_REASON_2"


def go(e: Exception, ok: bool) -> None:
    raise InvalidRequest("m", reason="NOT_A_REASON_3" if ok else Reason.NOT_A_REASON_4)


def helper_call() -> None:
    raise _fail("cwd", "bad", "NOT_A_REASON_5")


def compare(e: InvalidRequest) -> bool:
    return e.reason in ("NOT_A_REASON_6", Reason.INVALID_CWD) or e.reason == "NOT_A_REASON_7"


def reload(reason: str) -> bool:  # not an error-making helper: its reason is not checked
    return bool(reason)


def reloads() -> bool:
    return reload("a file changed")
"""


def test_checks_catch_reasons_outside_the_catalog() -> None:
    scan = scan_module(_BROKEN_MODULE, "broken.py")
    problems = check_uses(scan, CATALOG)
    for n in range(1, 8):
        assert any(f"'NOT_A_REASON_{n}'" in p for p in problems), (n, problems)
    assert not any("INVALID_CWD" in p or "a file changed" in p for p in problems)
    # The classes the reasons come with, through the helper's return and the class's bases.
    codes = expected_codes(scan)
    assert codes["NOT_A_REASON_1"] == codes["NOT_A_REASON_5"] == {"INVALID_ARGUMENT"}
    assert codes["NOT_A_REASON_2"] == {"INVALID_ARGUMENT"}


def _new(problems: list[str], baseline: list[str]) -> list[str]:
    """The problems a broken input adds (the repository's own are the other tests' to report)."""
    return [p for p in problems if p not in baseline]


def test_checks_catch_a_dead_entry(scan: Scan) -> None:
    baseline = check_dead_entries(scan, CATALOG)
    assert _new(check_dead_entries(scan, CATALOG | {"NEVER_USED_ANYWHERE"}), baseline) == [
        "Reason.NEVER_USED_ANYWHERE is used nowhere in airlock/: remove it or use it"
    ]
    # The gRPC code names are used only through the client's ``reason=code.name``.
    without = Scan(uses=scan.uses, code_names_as_reasons=False, bases=scan.bases)
    assert "Reason.DATA_LOSS is used nowhere in airlock/: remove it or use it" in (
        check_dead_entries(without, CATALOG)
    )


def test_checks_catch_a_missing_grpc_code(scan: Scan) -> None:
    baseline = check_code_names(scan, CATALOG)
    assert _new(check_code_names(scan, CATALOG - {"DATA_LOSS"}), baseline) == [
        "the client may report the gRPC code DATA_LOSS as a reason; add it to the catalog"
    ]


def test_checks_catch_docs_that_differ(scan: Scan) -> None:
    text = DOCS.read_text(encoding="utf-8")
    codes = expected_codes(scan)
    baseline = check_docs(text, CATALOG, codes)

    def new(broken: str) -> list[str]:
        return _new(check_docs(broken, CATALOG, codes), baseline)

    row = next(line for line in text.splitlines() if line.startswith("| `APPLY_CONFLICT` |"))
    assert new(text.replace(row + "\n", "")) == ["docs/errors.md has no row for APPLY_CONFLICT"]
    assert new(text + "| `NOT_IN_THE_CATALOG` | `UNKNOWN` | a | b |\n") == [
        "docs/errors.md has a row for NOT_IN_THE_CATALOG, which is not in the catalog"
    ]
    assert [p for p in new(text + row + "\n") if "second row" in p]
    wrong_code = text.replace(row, row.replace("`ABORTED`", "`INTERNAL`"))
    assert [p for p in new(wrong_code) if "ABORTED too" in p]
    not_a_code = text.replace(row, row.replace("`ABORTED`", "`ABORTED`, `NOT_A_CODE`"))
    assert [p for p in new(not_a_code) if "not a gRPC code" in p]
    no_action = text.replace(row, "| `APPLY_CONFLICT` | `ABORTED` | Changed. |  |")
    assert [p for p in new(no_action) if "lacks" in p]


def test_checks_catch_a_proto_list_that_differs() -> None:
    text = PROTO.read_text(encoding="utf-8")
    baseline = check_proto(text, CATALOG)

    def new(broken: str) -> list[str]:
        return _new(check_proto(broken, CATALOG), baseline)

    assert new(text.replace(" APPLY_CONFLICT,", "")) == [
        "the proto's list of reasons lacks APPLY_CONFLICT"
    ]
    assert new(text.replace(" APPLY_CONFLICT,", " APPLY_CONFLICT, NOPE,")) == [
        "the proto lists NOPE, which is not in the catalog"
    ]
    assert check_proto(text.replace("// Reasons:", "// Reason list:"), CATALOG) == [
        "the proto has no (or more than one) '// Reasons:' list"
    ]
