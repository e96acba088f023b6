"""Code run in a forked child, its result pickled back to the test (namespaces stay there)."""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any

from airlock.sandbox import _syscalls as sc
from airlock.sandbox import mnt


def in_child(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a forked child: what it returned, pickled back through a pipe. An error
    in the child (raised by ``fn`` or in pickling its result) fails the caller."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            # Only the forking thread: a library's fork handler that restarted its threads here
            # (gRPC's, tests/__init__.py) would leave threads and descriptors in the child.
            threads = os.listdir("/proc/self/task")
            assert threads == [str(os.getpid())], f"threads in the forked child: {threads}"
            view = memoryview(pickle.dumps(fn()))
            while view:
                view = view[os.write(w, view) :]
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 20):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and chunks, "the forked child failed"
    return pickle.loads(b"".join(chunks))


def in_mount_namespace(fn: Callable[[], object]) -> object:
    """``fn()`` in a forked child in a private mount namespace; its result or its error (an
    ``OSError`` as it is, any other as its ``repr``)."""

    def attempt() -> object:
        try:
            sc.unshare(sc.CLONE_NEWNS)
            mnt.make_private()
            return fn()
        except BaseException as exc:
            return exc if isinstance(exc, OSError) else repr(exc)

    return in_child(attempt)
