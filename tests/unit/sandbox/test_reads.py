"""Which paths count as sensitive reads: the globs of airlock.sandbox.reads (the capture on the
real kernel: tests/sandbox/test_reads.py)."""

from __future__ import annotations

import pytest

from airlock.sandbox import reads
from airlock.sandbox.reads import compile_globs

HOME = "/home/airlock-reads-test"


@pytest.mark.parametrize(
    ("path", "hit"),
    [
        (f"{HOME}/.ssh/id_rsa", True),
        (f"{HOME}/.ssh/keys/deep", True),
        (f"{HOME}/.sshd/x", False),
        (f"{HOME}/.netrc", True),
        (f"{HOME}/.netrc.bak", False),
        (f"{HOME}/.config/gcloud/credentials.db", True),
        (f"{HOME}/.config/google-chrome/Default/Login Data", True),
        (f"{HOME}/.config/google-chrome/Login Data", False),
        (f"{HOME}/.mozilla/firefox/x.default/logins.json", True),
        (f"{HOME}/.mozilla/firefox/a/b/logins.json", False),
        ("/srv/app/.env", True),
        ("/.env", True),
        ("/srv/app/.env.local", True),
        ("/srv/app/.envrc", False),
        ("/srv/app/x.env", False),
        ("/etc/shadow", True),
        ("/etc/shadow.d/x", False),
        ("/other/home/.ssh/id_rsa", False),
    ],
)
def test_glob_semantics(path: str, hit: bool) -> None:
    pattern = compile_globs(reads.DEFAULT_SENSITIVE_GLOBS, HOME)
    assert bool(pattern.fullmatch(path.encode())) is hit


def test_no_globs_match_nothing() -> None:
    assert compile_globs((), HOME).fullmatch(b"/etc/shadow") is None


_ODD_GLOBS = ("~", "~x", "~/a/*/b", "~/**", "**", "x?y", "/a/**/b", ".env.*", "~/.ssh/**")


@pytest.mark.parametrize(
    "home", [HOME, HOME + "/", "/root", "/", "", "rel/home", "/home/st*r", "/home/q?", "/h\nx"]
)
def test_matcher_agrees_with_the_compiled_globs(home: str) -> None:
    """GlobMatcher (compiled once, home apart) says what compile_globs(globs, home) says."""
    globs = (*reads.DEFAULT_SENSITIVE_GLOBS, *_ODD_GLOBS)
    h = home.rstrip("/")
    rests = (
        "", "/", "x", "/x", "/.ssh", "/.ssh/", "/.ssh/id_rsa", "/.sshd/x", "/a/c/b", "/a/c/d/b",
        "/.env", "/p/.env.local", "/.netrc", "/.netrc.bak", "/xzy", "/q/x/y", "\n/.ssh/k",
        "/.mozilla/firefox/x.default/logins.json", "/.mozilla/firefox/a/b/logins.json",
    )  # fmt: skip
    paths = [h + r for r in rests] + [
        "/etc/shadow", "/etc/shadowx", "/a/b", "/a/x/y/b", "/srv/.env", "/other/.ssh/k", "/",
        "/home", "/home/stxr/.ssh/k", "/home/q1/.ssh/k", "/home/st*r/.ssh/k",
    ]  # fmt: skip
    for one in [globs, *((g,) for g in globs), ()]:
        single, one_matcher = compile_globs(one, home), reads.GlobMatcher(one, home)
        for p in paths:
            raw = p.encode()
            assert one_matcher.fullmatch(raw) == bool(single.fullmatch(raw)), (one, p, home)
    default = reads.GlobMatcher(reads.DEFAULT_SENSITIVE_GLOBS, home)
    assert default.fullmatch(b"/etc/shadow") and not default.fullmatch(b"/etc/passwd")
