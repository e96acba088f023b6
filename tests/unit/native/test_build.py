"""native/build.py: the sandbox's init program is static, and linked with musl when musl is
installed (``make install`` installs it: glibc's start-up costs ~0.4 ms of CPU per sandbox
here, decisions §41)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import CHECKOUT

PT_INTERP = 3

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc)")


def _build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("native_build", CHECKOUT / "native" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _program_headers(path: Path) -> list[int]:
    """The ``p_type`` of each program header of a 64-bit little-endian ELF file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]


def _musl_installed() -> bool:
    machine = subprocess.run(["cc", "-dumpmachine"], capture_output=True, text=True).stdout
    return (Path("/usr/lib") / machine.strip().replace("-gnu", "-musl") / "libc.a").exists()


@needs_cc
@pytest.mark.parametrize("libc", ["", "glibc"])
def test_the_init_is_static_and_runs(
    libc: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRLOCK_INIT_LIBC", libc)
    out = tmp_path / "init"
    linked = _build_module().build(out)
    assert linked == ("musl" if not libc and _musl_installed() else "glibc")
    types = _program_headers(out)
    assert PT_INTERP not in types  # no dynamic loader: nothing to map at each start
    # It runs: an argument without its value is refused on the status pipe (fd 11), by name.
    r, w = os.pipe()
    try:
        pid = os.posix_spawn(
            str(out), [str(out), "--proc"], {}, file_actions=[(os.POSIX_SPAWN_DUP2, w, 11)]
        )
        os.close(w)
        _, status = os.waitpid(pid, 0)
        said = os.read(r, 4096)
    finally:
        os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert said == b"Esetup\0sandbox init: arguments --proc: Invalid argument"


@needs_cc
def test_musl_when_asked_and_missing_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = _build_module()
    if _musl_installed():
        monkeypatch.setattr(build, "_musl", lambda cc, headers: None)  # as on a machine without
    monkeypatch.setenv("AIRLOCK_INIT_LIBC", "musl")
    with pytest.raises(SystemExit, match="musl is not installed"):
        build.build(tmp_path / "init")
    assert not (tmp_path / "init").exists()


def test_an_unknown_libc_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRLOCK_INIT_LIBC", "uclibc")
    with pytest.raises(SystemExit, match="musl or glibc"):
        _build_module().build(tmp_path / "init")
    assert not (tmp_path / "init").exists()
