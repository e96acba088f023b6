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
