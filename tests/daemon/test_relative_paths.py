"""Execute in a user's home: relative paths are judged as what they name (a real daemon with the
shipped default policy, a real non-root user whose home is a temporary directory).

Execute is judged by the static pass alone and binds its working directory read-write, and
the home is an allowed working directory: `echo alias ls=rm >> .bashrc` run there must be
asked about (persist.shell-rc) like `>> ~/.bashrc`, and `.ssh/authorized_keys` denied, before
anything runs (docs/decisions.md, "Relative paths are judged from the cwd"). The same line in
a project directory of that home writes the project's own .bashrc, which is no start-up file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from airlock.client import Client
from tests.helpers import public_dir
from tests.helpers.users import run_client_as, temporary_user

RC = "# the user's own\n"


@pytest.fixture
def user() -> Iterator[tuple[int, Path]]:
    """A real user whose home holds a .bashrc and a project directory: (uid, home)."""
    with public_dir() as base, temporary_user(base / "u") as (uid, gid):
        home = base / "u"
        (home / ".bashrc").write_text(RC)
        (home / "project").mkdir()
        for path in (home / ".bashrc", home / "project"):
            os.chown(path, uid, gid)
        yield uid, home


def execute_as(client: Client, uid: int, command: str, cwd: Path) -> dict[str, object]:
    """Execute ``command`` in ``cwd`` as the real user ``uid``: its outcome, as JSON."""
    proc = run_client_as(
        f"with Client({client.socket_path!r}) as c:\n"
        "    try:\n"
        f"        events = list(c.execute({command!r}, cwd={str(cwd)!r}))\n"
        "        print(json.dumps({'ran': True, 'exit': events[-1].exit_code}))\n"
        "    except AirlockError as e:\n"
        "        print(json.dumps({'ran': False, 'reason': e.reason, 'message': str(e)}))\n",
        uid=uid,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_execute_in_the_home_asks_before_writing_a_startup_file(
    client: Client, user: tuple[int, Path]
) -> None:
    uid, home = user
    # In a project of the home, .bashrc is the project's own file: it runs, unasked.
    outcome = execute_as(client, uid, "echo alias ls=rm >> .bashrc", home / "project")
    assert outcome == {"ran": True, "exit": 0}
    assert (home / "project" / ".bashrc").read_text() == "alias ls=rm\n"
    # In the home itself it is the shell's start-up file: asked, not run.
    for command in ("echo alias ls=rm >> .bashrc", "echo alias ls=rm >> ./sub/../.bashrc"):
        outcome = execute_as(client, uid, command, home)
        assert outcome["ran"] is False, outcome
        assert outcome["reason"] == "APPROVAL_REQUIRED", outcome
        assert "persist.shell-rc" in str(outcome["message"]), outcome
    assert (home / ".bashrc").read_text() == RC


def test_execute_in_the_home_denies_installing_an_authorized_key(
    client: Client, user: tuple[int, Path]
) -> None:
    uid, home = user
    outcome = execute_as(client, uid, "mkdir -p .ssh && echo key >> .ssh/authorized_keys", home)
    assert outcome["ran"] is False and outcome["reason"] == "POLICY_DENIED", outcome
    assert not (home / ".ssh").exists()
