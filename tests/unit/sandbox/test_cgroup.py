"""Cgroup detection from mount tables, and cgroup specs, without touching a real cgroup.

The detection tests read mountinfo text that points at temporary directories; the limits on
this host's real cgroups are tested in tests/sandbox/test_cgroup.py (root).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airlock._errors import SandboxError
from airlock.sandbox.cgroup import (
    Cgroup,
    CgroupHost,
    CgroupSpec,
    CgroupStats,
    detect,
    remove_group,
    sweep,
)
from airlock.types import CgroupVersion

MiB = 1024 * 1024

# --- detect() on mountinfo text ------------------------------------------------------------


def _line(n: int, path: str, fstype: str, super_opts: str, mount_opts: str = "rw,relatime") -> str:
    escaped = path.replace("\\", "\\134").replace(" ", "\\040")
    return f"{n} 31 0:{n} / {escaped} {mount_opts} shared:{n} - {fstype} {fstype} {super_opts}\n"


def _mountinfo(tmp_path: Path, *lines: str) -> str:
    base = "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    base += "31 22 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    f = tmp_path / "mountinfo"
    f.write_text(base + "".join(lines))
    return str(f)


def _unified(tmp_path: Path, name: str, controllers: str) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "cgroup.controllers").write_text(controllers + "\n")
    return str(d)


def _v1_lines(tmp_path: Path, cpuacct: bool = True) -> list[str]:
    t = str(tmp_path)
    lines = [
        _line(32, f"{t}/cpu", "cgroup", "rw,cpu"),
        _line(35, f"{t}/memory", "cgroup", "rw,memory"),
        _line(39, f"{t}/pids", "cgroup", "rw,pids"),
        _line(40, f"{t}/systemd", "cgroup", "rw,xattr,name=systemd"),
    ]
    if cpuacct:
        lines.append(_line(33, f"{t}/cpuacct", "cgroup", "rw,cpuacct"))
    return lines


def test_detect_v2(tmp_path: Path) -> None:
    root = _unified(tmp_path, "cg2", "cpuset cpu io memory hugetlb pids rdma misc")
    host = detect(_mountinfo(tmp_path, _line(41, root, "cgroup2", "rw,nsdelegate")))
    assert host == CgroupHost(CgroupVersion.V2, ("memory", "pids", "cpu"), (("unified", root),))


def test_detect_v2_takes_the_first_usable_cgroup2_mount(tmp_path: Path) -> None:
    empty = _unified(tmp_path, "empty", "hugetlb")
    ro = _unified(tmp_path, "ro", "memory pids")
    good = _unified(tmp_path, "with space", "memory pids io")
    later = _unified(tmp_path, "later", "memory pids")
    host = detect(
        _mountinfo(
            tmp_path,
            _line(41, "/sys/fs/cgroup", "cgroup2", "rw"),  # no cgroup.controllers on this host
            _line(42, empty, "cgroup2", "rw"),
            _line(43, ro, "cgroup2", "rw", mount_opts="ro,nosuid"),
            _line(44, good, "cgroup2", "rw"),
            _line(45, later, "cgroup2", "rw"),
            *_v1_lines(tmp_path),
        )
    )
    assert host.version == CgroupVersion.V2
    assert host.roots == (("unified", good),)


def test_detect_v1_hybrid(tmp_path: Path) -> None:
    # This machine's layout: v1 memory/pids/cpu/cpuacct, an empty cgroup2 at .../unified.
    t = str(tmp_path)
    unified = _unified(tmp_path, "unified", "hugetlb")
    host = detect(_mountinfo(tmp_path, *_v1_lines(tmp_path), _line(41, unified, "cgroup2", "rw")))
    assert host == CgroupHost(
        CgroupVersion.V1,
        ("memory", "pids", "cpu"),
        (("memory", f"{t}/memory"), ("pids", f"{t}/pids"), ("cpuacct", f"{t}/cpuacct")),
    )


def test_detect_v1_comounted_and_without_cpuacct(tmp_path: Path) -> None:
    t = str(tmp_path)
    host = detect(
        _mountinfo(
            tmp_path,
            _line(33, f"{t}/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"),
            _line(35, f"{t}/memory", "cgroup", "rw,memory"),
            _line(39, f"{t}/pids", "cgroup", "rw,pids"),
        )
    )
    assert host.roots[2] == ("cpuacct", f"{t}/cpu,cpuacct")
    no_cpuacct = detect(_mountinfo(tmp_path, *_v1_lines(tmp_path, cpuacct=False)))
    assert no_cpuacct.version == CgroupVersion.V1
    assert no_cpuacct.controllers == ("memory", "pids")
    assert [k for k, _ in no_cpuacct.roots] == ["memory", "pids"]


def test_detect_none(tmp_path: Path) -> None:
    t = str(tmp_path)
    no_pids = _unified(tmp_path, "cg2", "cpu io memory")
    only_memory_v1 = _line(35, f"{t}/memory", "cgroup", "rw,memory")
    ro_pids_v1 = _line(39, f"{t}/pids", "cgroup", "rw,pids", mount_opts="ro")
    host = detect(
        _mountinfo(tmp_path, _line(41, no_pids, "cgroup2", "rw"), only_memory_v1, ro_pids_v1)
    )
    assert host == CgroupHost(CgroupVersion.NONE, (), ())
    assert detect(str(tmp_path / "missing")).version == CgroupVersion.NONE
    assert detect(_mountinfo(tmp_path)).version == CgroupVersion.NONE


def test_detect_result_is_picklable_and_immutable() -> None:
    import pickle

    host = CgroupHost(CgroupVersion.V1, ("memory", "pids"), (("memory", "/m"), ("pids", "/p")))
    spec = CgroupSpec(host, "airlock-1", "sb-1", 64 * MiB, 20)
    assert pickle.loads(pickle.dumps(spec)) == spec
    with pytest.raises(AttributeError):
        host.version = CgroupVersion.V2  # type: ignore[misc]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "x\0"])
def test_spec_rejects_names_that_are_not_one_path_component(name: str) -> None:
    host = CgroupHost(CgroupVersion.NONE)
    with pytest.raises(ValueError, match="one path component"):
        CgroupSpec(host, "airlock-1", name, MiB, 1)
    with pytest.raises(ValueError, match="one path component"):
        CgroupSpec(host, name, "sb-1", MiB, 1)


def test_spec_rejects_non_positive_limits() -> None:
    host = CgroupHost(CgroupVersion.NONE)
    with pytest.raises(ValueError, match="memory_bytes"):
        CgroupSpec(host, "g", "n", 0, 1)
    with pytest.raises(ValueError, match="pids"):
        CgroupSpec(host, "g", "n", MiB, 0)


def test_version_none_is_a_no_op() -> None:
    spec = CgroupSpec(CgroupHost(CgroupVersion.NONE), "airlock-x", "sb-1", MiB, 1)
    cg = Cgroup.create(spec)
    assert cg.paths == ()
    cg.attach(os.getpid())
    assert cg.stats() == CgroupStats(0, 0, False, 0.0)
    cg.kill()
    cg.remove()
    assert sweep(spec.host, "airlock-x") == 0
    remove_group(spec.host, "airlock-x")


def test_create_fails_closed_when_a_limit_cannot_be_written(tmp_path: Path) -> None:
    # Plain directories stand in for hierarchies: mkdir works, but no limit files appear.
    roots = tuple((k, str(tmp_path / k)) for k in ("memory", "pids"))
    for _, r in roots:
        os.mkdir(r)
    host = CgroupHost(CgroupVersion.V1, ("memory", "pids"), roots)
    with pytest.raises(SandboxError) as info:
        Cgroup.create(CgroupSpec(host, "airlock-g", "sb-1", 64 * MiB, 20))
    assert "memory.limit_in_bytes" in info.value.message
    assert "ENOENT" in info.value.message
    for _, r in roots:  # the child directories were removed again; the parents stay
        assert os.listdir(os.path.join(r, "airlock-g")) == []
