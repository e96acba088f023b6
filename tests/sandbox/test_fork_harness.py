"""The suite's own forks (tests/helpers/fork.py) after gRPC was used in this process.

tests/daemon runs gRPC's client inside pytest; the sandbox tests then fork pytest, unshare a pid
namespace and fork again. With gRPC's fork support on, its fork handlers restarted gRPC's
threads and descriptors in those children (a netcap test counting descriptors saw one more) and,
after ``unshare(CLONE_NEWPID)``, retried ``pthread_create`` for seconds (five tests failed in CI).
tests/__init__.py turns it off; this checks the children stay clean.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import grpc

from airlock.sandbox import _syscalls as sc
from tests.helpers.fork import in_child


def _state() -> tuple[list[str], list[str]]:
    return sorted(os.listdir("/proc/self/task")), sorted(os.listdir("/proc/self/fd"))


def _fork_in_new_pid_namespace() -> tuple[tuple[list[str], list[str]], ...]:
    before = _state()
    sc.unshare(sc.CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(0.3)  # a restarted thread pool would be starting its threads by now
    return before, _state()


def test_a_child_forked_after_grpc_ran_carries_none_of_it(tmp_path: Path) -> None:
    for close_first in (False, True):  # a channel still open, and one closed (both seen in CI)
        channel = grpc.insecure_channel(f"unix://{tmp_path}/nothing.sock")
        with contextlib.suppress(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=0.2)
        if close_first:
            channel.close()
        try:
            before, after = in_child(_fork_in_new_pid_namespace)
        finally:
            channel.close()
        assert before == after, close_first
        assert len(after[0]) == 1, after  # the forking thread alone
