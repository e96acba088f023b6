"""airlockd as a service, as root: a daemon that runs from its configuration file, and
`make install-service` into a DESTDIR (its systemd-tmpfiles makes a root-owned /run/airlock).
The file itself, --print-config and the rest of the packaging: tests/unit/daemon/test_config.py.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.helpers import AIRLOCKD, CHECKOUT, NEUTRAL_POLICY, running_daemon
from tests.helpers.packaging import install_service, unit_settings

EXAMPLE = CHECKOUT / "packaging" / "airlockd.toml"
TMPFILES = CHECKOUT / "packaging" / "tmpfiles.d" / "airlock.conf"


def print_config(*args: str) -> str:
    result = subprocess.run(
        [AIRLOCKD, *args, "--print-config"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_daemon_runs_from_its_config_file(public_tmp: Path) -> None:
    # running_daemon passes --socket and --state-dir; the file names the same paths, and
    # --print-config shows they come from the file alone.
    cfg = write(
        public_tmp / "airlockd.toml",
        f'socket = "{public_tmp}/airlock.sock"\n'
        f'state-dir = "{public_tmp}/state"\n'
        'socket-mode = "0666"\n'
        f'policy-dir = "{NEUTRAL_POLICY[1]}"\n'
        'memory-limit = "256M"\npids-limit = 64\noutput-limit = "64K"\nmax-timeout = 60\n'
        "warm-pool = 1\n",
    )
    values = tomllib.loads(print_config("--config", str(cfg)))
    assert values["socket"] == f"{public_tmp}/airlock.sock"
    assert values["state-dir"] == f"{public_tmp}/state"
    with running_daemon(public_tmp, "--config", str(cfg)) as daemon, daemon.client() as client:
        assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o666
        limits = client.capabilities().limits
        assert limits.memory_bytes == 256 * 1024**2 and limits.pids == 64
        assert limits.output_bytes == 64 * 1024 and limits.max_timeout_s == 60
        assert client.validate("echo hi", cwd="/tmp").stdout == b"hi\n"
        assert (public_tmp / "state" / "audit.sqlite3").exists()
        assert f'"msg": "configuration", "file": "{cfg}"' in daemon.log()
    assert daemon.proc.returncode == 0


# --- systemd packaging ------------------------------------------------------------------------


def test_install_service_into_a_destdir(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = install_service(root, "install-service", f"AIRLOCKD={AIRLOCKD}")
    assert result.returncode == 0, result.stderr
    assert "systemctl enable --now airlockd" in result.stdout  # said, not done
    unit = root / "etc/systemd/system/airlockd.service"
    settings = unit_settings(unit.read_text())
    assert settings["ExecStart"] == [f"{AIRLOCKD} --config /etc/airlock/airlockd.toml"]
    assert (root / "etc/tmpfiles.d/airlock.conf").read_bytes() == TMPFILES.read_bytes()
    assert (root / "etc/airlock/airlockd.toml").read_bytes() == EXAMPLE.read_bytes()
    run_dir = root / "run/airlock"  # systemd-tmpfiles --root ran the entry
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o755 and run_dir.stat().st_uid == 0
    # The default: this checkout's own airlockd (`make install` makes it).
    if os.access(CHECKOUT / ".venv/bin/airlockd", os.X_OK):
        other = tmp_path / "other"
        assert install_service(other, "install-service").returncode == 0
        exec_start = unit_settings((other / "etc/systemd/system/airlockd.service").read_text())
        assert exec_start["ExecStart"] == [
            f"{CHECKOUT}/.venv/bin/airlockd --config /etc/airlock/airlockd.toml"
        ]
    # An operator's configuration is never overwritten.
    (root / "etc/airlock/airlockd.toml").write_text('memory-limit = "1G"\n')
    result = install_service(root, "install-service", f"AIRLOCKD={AIRLOCKD}")
    assert result.returncode == 0 and "kept the existing" in result.stdout
    assert (root / "etc/airlock/airlockd.toml").read_text() == 'memory-limit = "1G"\n'
    # Uninstalling removes the unit and the tmpfiles.d entry, and keeps the configuration.
    result = install_service(root, "uninstall-service")
    assert result.returncode == 0, result.stderr
    assert not unit.exists() and not (root / "etc/tmpfiles.d/airlock.conf").exists()
    assert (root / "etc/airlock/airlockd.toml").exists() and "kept:" in result.stdout


def test_systemd_analyze_verifies_the_installed_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    root = tmp_path / "root"
    # ExecStart must name an executable that exists: the venv's airlockd.
    assert install_service(root, "install-service", f"AIRLOCKD={AIRLOCKD}").returncode == 0
    unit = root / "etc/systemd/system/airlockd.service"
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "airlockd.service" not in result.stderr, result.stderr
    # And it does check: a missing binary fails.
    broken = tmp_path / "broken" / "airlockd.service"
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace(AIRLOCKD, f"{tmp_path}/no-airlockd"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "no-airlockd" in result.stderr
