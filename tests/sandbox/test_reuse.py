"""A supervisor builds its next sandbox only when nothing of the last one is left with it
(sandbox/contain.py, "Reuse"): the host's namespaces again, exactly the descriptors it started
with, within its run and memory bounds. Each check runs in a forked child (namespaces)."""

from __future__ import annotations

import json
import mmap
import os

import pytest

from airlock.sandbox import _syscalls as sc
from airlock.sandbox import contain
from tests.helpers.fork import in_child

_KINDS = ("mnt", "net", "uts", "ipc")


def _namespaces(pid: int | str) -> dict[str, str]:
    return {k: os.readlink(f"/proc/{pid}/ns/{k}") for k in _KINDS}


def test_reuse_goes_back_to_the_host_namespaces() -> None:
    parent = os.getpid()

    def child() -> tuple[bool, bool, bool]:
        host = contain._Host()
        sc.unshare(sc.CLONE_NEWNS | sc.CLONE_NEWNET | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC)
        elsewhere = _namespaces("self") != _namespaces(parent)
        again = host.again()
        return elsewhere, again, _namespaces("self") == _namespaces(parent)

    assert in_child(child) == (True, True, True)


def test_a_descriptor_left_open_ends_the_process_instead(capfd: pytest.CaptureFixture[str]) -> None:
    def child() -> tuple[bool, bool]:
        host = contain._Host()
        leaked = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        with_leak = host.again()
        os.close(leaked)
        return with_leak, host.again()

    assert in_child(child) == (False, True)
    said = [json.loads(line) for line in capfd.readouterr().err.splitlines() if "reused" in line]
    assert [(s["level"], s["left_open"]) for s in said] == [("warning", ["/dev/null"])]


def test_the_run_and_memory_bounds_end_it() -> None:
    def child() -> tuple[bool, bool]:
        host = contain._Host()
        host.runs = contain.REUSE_RUNS - 1
        past_runs = host.again()
        host.runs = 0
        contain.REUSE_GROWTH_BYTES = 1024 * 1024
        grown = mmap.mmap(-1, 4 * 1024 * 1024)  # new memory, made resident by writing it
        grown.write(b"x" * len(grown))
        return past_runs, host.again()

    assert in_child(child) == (False, False)


def test_a_cold_request_socket_is_not_part_of_the_baseline() -> None:
    def child() -> bool:
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        host = contain._Host(transient=(fd,))
        os.close(fd)
        return host.again()

    assert in_child(child) is True
