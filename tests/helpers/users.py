"""Running client code as a real non-root user."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

NOBODY = 65534

# What a client script needs, imported while still root: the checkout (and its venv) may sit under
# a directory only root can enter (a clone in /root), and grpc imports some modules only on first
# use (`grpc._channel` when a channel is made), which would fail once the script is uid 65534.
CLIENT_PRELUDE = """\
import json, os, sys
import grpc, grpc._channel, grpc._interceptor, grpc._utilities
import grpc_status.rpc_status, google.rpc.error_details_pb2, encodings.idna
from airlock import AirlockError
from airlock.client import Client
os.setgroups([]); os.setresgid({uid}, {uid}, {uid}); os.setresuid({uid}, {uid}, {uid})
"""


def run_client_as(
    body: str, uid: int = NOBODY, timeout: float = 60, groups: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``body`` (Python using ``Client``, ``AirlockError``, ``json``) as a real user ``uid``.

    Imports happen as root, then the process drops to ``uid`` (gid ``uid``, supplementary
    ``groups``, none by default) before ``body`` connects: SO_PEERCRED records the credentials
    at connect, so the daemon sees a real non-root caller.
    """
    prelude = CLIENT_PRELUDE.format(uid=uid).replace(
        "os.setgroups([])", f"os.setgroups({list(groups)!r})"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + body],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=timeout,
    )


@contextlib.contextmanager
def temporary_user(home: Path) -> Iterator[tuple[int, int]]:
    """A real user (``useradd``) whose home is ``home`` (made here, owned by the user): its
    (uid, gid). Removed (``userdel``) on exit; ``home`` is left to the caller's directory."""
    name = f"airlock-t{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh",
         "--user-group", name],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        entry = pwd.getpwnam(name)
        home.mkdir(mode=0o755, exist_ok=True)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        yield entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)
