"""Relative paths are judged as what they name from the request's cwd, for the caller's home.

The static pass matches path patterns (``~/.bashrc``, ``/home/*/.ssh/authorized_keys*``,
``/etc/profile.d/*``) against the words of a command. A word written relative to the working
directory (``.bashrc`` in the home, ``./.bashrc``, ``sub/../.bashrc``, ``authorized_keys``
after ``cd .ssh``) names the same file as its ``~/`` spelling, and must get the same verdict:
Execute judges by the static pass alone, and the home is an allowed Execute working directory
(docs/decisions.md, "Relative paths are judged from the cwd"). ``airlock.policy.rules``
(``PathContext``, ``_Paths``); the engine's memo (tests/unit/core/test_static_memo.py); the
daemon (tests/daemon/test_static_pass.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airlock.cli import policy as policy_cli
from airlock.policy.loader import PolicyBundle, load_bundle
from airlock.policy.rules import PathContext
from airlock.policy.store import default_policy_dir
from airlock.types import Verdict
from tests.helpers.policy import load_policy, policy, rule_yaml

HOME = "/home/u"
AT_HOME = PathContext(cwd=HOME, home=HOME)
IN_PROJECT = PathContext(cwd=HOME + "/project", home=HOME)


@pytest.fixture(scope="module")
def shipped() -> PolicyBundle:
    return load_bundle(default_policy_dir())


def judged(
    bundle: PolicyBundle, line: str, context: PathContext | None
) -> tuple[Verdict, set[str]]:
    """The static verdict (ALLOW for none) and the ids of the rules that fired."""
    v = bundle.evaluate(bundle.analyze(line), context=context)
    return v.verdict or Verdict.ALLOW, {f.rule_id for f in v.findings}


# (relative spelling with cwd = the home, the ~ spelling, the rule that must fire, verdict)
SAME_AS_TILDE = [
    ("echo alias ls=rm >> .bashrc", "echo alias ls=rm >> ~/.bashrc", "persist.shell-rc", "ASK"),
    ("echo alias ls=rm >> ./.bashrc", "echo alias ls=rm >> ~/.bashrc", "persist.shell-rc", "ASK"),
    ("echo x >> sub/../.bashrc", "echo x >> ~/.bashrc", "persist.shell-rc", "ASK"),
    ("echo x >> ./sub/./../.profile", "echo x >> ~/.profile", "persist.shell-rc", "ASK"),
    ("cp evil .zshrc", "cp evil ~/.zshrc", "persist.shell-rc", "ASK"),
    ("sed -i s/a/b/ .bashrc", "sed -i s/a/b/ ~/.bashrc", "persist.shell-rc", "ASK"),
    (
        "echo k >> .ssh/authorized_keys",
        "echo k >> ~/.ssh/authorized_keys",
        "persist.ssh-authorized-keys",
        "DENY",
    ),
    (
        "mkdir -p .ssh && cp x .ssh/authorized_keys",
        "mkdir -p ~/.ssh && cp x ~/.ssh/authorized_keys",
        "persist.ssh-authorized-keys",
        "DENY",
    ),
    (
        "cd .ssh && echo k >> authorized_keys",
        "echo k >> ~/.ssh/authorized_keys",
        "persist.ssh-authorized-keys",
        "DENY",
    ),
    (
        "cd sub; cd ../.ssh; tee -a authorized_keys < k",
        "tee -a ~/.ssh/authorized_keys < k",
        "persist.ssh-authorized-keys",
        "DENY",
    ),
    # A function defined before the cd runs after it: any cd of the line may come first.
    (
        "f() { echo k >> authorized_keys; }; cd .ssh; f",
        "echo k >> ~/.ssh/authorized_keys",
        "persist.ssh-authorized-keys",
        "DENY",
    ),
    ("rm -rf .", "rm -rf ~", "fs.rm-home", "DENY"),
]


@pytest.mark.parametrize(("relative", "tilde", "rule_id", "verdict"), SAME_AS_TILDE)
def test_a_relative_path_in_the_home_is_judged_as_its_tilde_spelling(
    shipped: PolicyBundle, relative: str, tilde: str, rule_id: str, verdict: str
) -> None:
    expected = judged(shipped, tilde, AT_HOME)
    assert expected[0] is Verdict[verdict] and rule_id in expected[1]  # the reference
    got = judged(shipped, relative, AT_HOME)
    assert got[0] is expected[0], got
    assert rule_id in got[1]


@pytest.mark.parametrize(
    ("line", "rule_id"),
    [
        ("echo alias ls=rm >> .bashrc", "persist.shell-rc"),
        ("echo x >> ./.bashrc", "persist.shell-rc"),
        ("cp evil .zshrc", "persist.shell-rc"),
        ("echo k >> .ssh/authorized_keys", "persist.ssh-authorized-keys"),
        ("cd .ssh && echo k >> authorized_keys", "persist.ssh-authorized-keys"),
    ],
)
def test_the_same_relative_path_in_a_project_is_not_the_startup_file(
    shipped: PolicyBundle, line: str, rule_id: str
) -> None:
    """/home/u/project/.bashrc is a file of the project, not the shell's: no persistence
    finding there (as for the spelling ~/project/.bashrc), where the home gets one."""
    assert rule_id in judged(shipped, line, AT_HOME)[1]
    verdict, fired = judged(shipped, line, IN_PROJECT)
    assert not {r for r in fired if r.startswith("persist.")}, fired
    assert verdict is not Verdict.DENY


def test_climbing_out_of_the_project_reaches_the_home(shipped: PolicyBundle) -> None:
    assert "persist.shell-rc" in judged(shipped, "echo x >> ../.bashrc", IN_PROJECT)[1]
    assert "persist.shell-rc" not in judged(shipped, "echo x >> ../.bashrc", AT_HOME)[1]


def test_relative_paths_into_system_directories(shipped: PolicyBundle) -> None:
    etc = PathContext(cwd="/etc", home=HOME)
    assert "persist.shell-rc" in judged(shipped, "echo x > profile.d/evil.sh", etc)[1]
    assert "persist.shell-rc" in judged(shipped, "cd /etc && echo x > profile", AT_HOME)[1]


def test_a_cd_the_analysis_cannot_follow_counts_as_the_home(shipped: PolicyBundle) -> None:
    """`cd "$D"` may lead anywhere; the files these rules protect are in the home."""
    for line in ('cd "$D" && echo x >> .bashrc', "cd - && echo x >> .bashrc", "cd; cp x .bashrc"):
        assert "persist.shell-rc" in judged(shipped, line, IN_PROJECT)[1], line


def test_a_home_reached_through_a_symbolic_link(shipped: PolicyBundle) -> None:
    """The cwd arrives with its links resolved; the password database may name the home
    through a link (/home -> /data/home)."""
    context = PathContext(cwd="/data/home/u", home=HOME, real_home="/data/home/u")
    assert judged(shipped, "echo x >> .bashrc", context)[0] is Verdict.ASK


def test_without_a_context_only_the_written_spelling_matches(shipped: PolicyBundle) -> None:
    """Inline tests and `policy diff` judge lines with no cwd: as before, but normalized."""
    assert judged(shipped, "echo x >> .bashrc", None) == (Verdict.ALLOW, set())
    assert "persist.shell-rc" in judged(shipped, "echo x >> ~/sub/../.bashrc", None)[1]


def test_an_exception_covers_a_relative_operand_only_as_what_it_names(tmp_path: Path) -> None:
    """An exception for build/* must not cover build/../../.bashrc, nor ~/.cache/* cover
    .cache/../.ssh/x; it does cover .cache/pip run from the home."""
    extra = """\
    exceptions:
      - values: ['build/*', '~/.cache/*']
        justification: scratch
    """
    bundle = load_policy(
        tmp_path,
        {
            "p.yaml": policy(
                rule_yaml("match", "{argv0: [rm]}", rid="t.rm", decision="deny", extra=extra)
            )
        },
        run_tests=False,
    )

    def fires(line: str, context: PathContext | None = AT_HOME) -> bool:
        return "t.rm" in judged(bundle, line, context)[1]

    assert not fires("rm -rf build/x")
    assert fires("rm -rf build/../../.bashrc")
    assert fires("rm -rf build/../../.bashrc", None)
    assert not fires("rm -rf .cache/pip")
    assert not fires("rm -rf ~/.cache/pip")
    assert fires("rm -rf .cache/../.ssh/id_rsa")
    assert fires("rm -rf ~/.cache/../.ssh/id_rsa", None)
    assert fires("rm -rf .cache/pip", IN_PROJECT)  # ~/project/.cache/pip is no package cache


def test_explain_shows_the_resolved_form(shipped: PolicyBundle) -> None:
    analysis = shipped.analyze("echo x >> .bashrc")
    hits = [
        h for h in shipped.explain(analysis, context=AT_HOME) if h.rule_id == "persist.shell-rc"
    ]
    assert hits and "'~/.bashrc'" in " ".join(hits[0].reasons)


def test_cli_explain_takes_a_cwd_and_a_home(capsys: pytest.CaptureFixture[str]) -> None:
    def verdict(*args: str) -> str | None:
        argv = ["explain", "--json", "--policy", str(default_policy_dir()), *args]
        code = policy_cli.main([*argv, "--", "echo x >> .bashrc"])
        assert code == 0
        doc = json.loads(capsys.readouterr().out)
        result: str | None = doc["verdict"]
        return result

    assert verdict("--cwd", HOME, "--home", HOME) == "ASK"
    assert verdict("--cwd", HOME + "/project", "--home", HOME) is None
