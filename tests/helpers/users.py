"""Running client code as a real non-root user."""

from __future__ import annotations

import subprocess
import sys

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
    body: str, uid: int = NOBODY, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``body`` (Python using ``Client``, ``AirlockError``, ``json``) as a real user ``uid``.

    Imports happen as root, then the process drops to ``uid`` (groups cleared) before ``body``
    connects: SO_PEERCRED records the credentials at connect, so the daemon sees a real non-root
    caller.
    """
    return subprocess.run(
        [sys.executable, "-c", CLIENT_PRELUDE.format(uid=uid) + body],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=timeout,
    )
