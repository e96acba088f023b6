"""airlockd's configuration file and --print-config, and the systemd packaging.

A daemon that runs from its file, and `make install-service` into a DESTDIR (root: its
systemd-tmpfiles makes a root-owned /run/airlock), are in tests/daemon/test_daemon_config.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from airlock.core.config import Approvers, DaemonConfig
from airlock.daemon import main
from airlock.types import Limits
from tests.helpers import AIRLOCKD, CHECKOUT, NEUTRAL_POLICY
from tests.helpers.packaging import install_service, unit_settings

EXAMPLE = CHECKOUT / "packaging" / "airlockd.toml"
UNIT = CHECKOUT / "packaging" / "systemd" / "airlockd.service"
TMPFILES = CHECKOUT / "packaging" / "tmpfiles.d" / "airlock.conf"
# --test-resolve is for tests only, --new-audit-log for one start: never configuration file keys.
NOT_SETTINGS = {"help", "config", "print-config", "version", "test-resolve", "new-audit-log"}


def airlockd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AIRLOCKD, *args], capture_output=True, text=True, timeout=60)


def print_config(*args: str) -> str:
    result = airlockd(*args, "--print-config")
    assert result.returncode == 0, result.stderr
    return result.stdout


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def flag_keys() -> set[str]:
    """Every option of `airlockd --help` that is a setting (the source of truth)."""
    result = airlockd("--help")
    assert result.returncode == 0
    usage = result.stdout.split("\n\n")[0]  # argparse never breaks an option there
    return set(re.findall(r"\[--([a-z][a-z-]*)", usage)) - NOT_SETTINGS


@pytest.fixture
def empty(tmp_path: Path) -> Path:
    """A configuration file that sets nothing: the built-in defaults, whatever /etc holds."""
    return write(tmp_path / "empty.toml", "")


def test_defaults_are_the_built_in_ones(empty: Path) -> None:
    values = tomllib.loads(print_config("--config", str(empty)))
    d, limits = DaemonConfig(), Limits()
    assert values == {
        "socket": d.socket_path,
        "state-dir": d.state_dir,
        "socket-mode": "0660",
        "default-timeout": limits.default_timeout_s,
        "max-timeout": limits.max_timeout_s,
        "memory-limit": "2G",
        "pids-limit": limits.pids,
        "scratch-size": "512M",
        "output-limit": "1M",
        "max-concurrent": limits.concurrent_validations,
        "max-connections": d.max_connections,
        "max-connections-per-uid": d.max_connections_per_uid,
        "first-request-timeout": d.first_request_timeout_s,
        "warm-pool": d.warm_pool,
        "warm-idle": d.warm_idle_s,
        "keep-changes-max": d.keep_changes_max,
        "keep-changes-quota": "2G",
        "keep-changes-share-per-uid": d.keep_changes_share_per_uid,
        "no-process-capture": False,
        "no-network-capture": False,
        "no-read-capture": False,
        "no-capture": False,
        "approvers": "0",
        "approver-groups": "",
        "allow-self-approval": False,
        "log-level": "info",
    }
    assert main.parse_args(["--config", str(empty)]) == (DaemonConfig(), "info")


def test_approvers_are_named_in_the_file_or_on_the_command_line(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "airlockd.toml",
        'approvers = "nobody, 1234"\napprover-groups = "root"\nallow-self-approval = true\n',
    )
    config, _ = main.parse_args(["--config", str(cfg)])
    # Root always approves; names are resolved once, at start.
    assert config.approvers == Approvers(uids=(0, 65534, 1234), gids=(0,), allow_self_approval=True)
    config, _ = main.parse_args(
        ["--config", str(cfg), "--approvers", "", "--allow-self-approval=false"]
    )
    assert config.approvers == Approvers(uids=(0,), gids=(0,), allow_self_approval=False)
    round_trip = write(tmp_path / "printed.toml", print_config("--config", str(cfg)))
    assert main.parse_args(["--config", str(round_trip)])[0].approvers.uids == (0, 65534, 1234)
    bad = write(tmp_path / "bad.toml", 'approvers = "no-such-user-here"\n')
    with pytest.raises(SystemExit) as exited:
        main.parse_args(["--config", str(bad)])
    assert exited.value.code == 2


def test_the_file_sets_and_flags_win(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "airlockd.toml",
        'memory-limit = "512M"\n'
        "pids-limit = 64\n"
        "default-timeout = 10\n"
        "no-network-capture = true\n"
        "no-process-capture = false\n"
        'log-level = "debug"\n'
        'socket-mode = "0600"\n',
    )
    config, level = main.parse_args(["--config", str(cfg)])
    assert config.limits.memory_bytes == 512 * 1024**2 and config.limits.pids == 64
    assert config.limits.default_timeout_s == 10.0 and config.socket_mode == 0o600
    assert not config.capture_network and config.trace_processes and level == "debug"
    # Every flag given wins over the file, booleans both ways.
    config, level = main.parse_args(
        [
            "--config",
            str(cfg),
            "--memory-limit",
            "1G",
            "--no-network-capture=false",
            "--no-process-capture",
            "--log-level",
            "warning",
        ]
    )
    assert config.limits.memory_bytes == 1024**3 and config.limits.pids == 64
    assert config.capture_network and not config.trace_processes and level == "warning"
    # The same through the real command line.
    text = print_config("--config", str(cfg), "--pids-limit", "32", "--no-network-capture=false")
    values = tomllib.loads(text)
    assert values["pids-limit"] == 32 and values["memory-limit"] == "512M"
    assert values["no-network-capture"] is False and values["log-level"] == "debug"


def test_the_default_file_is_read_only_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = tmp_path / "etc" / "airlockd.toml"
    monkeypatch.setattr(main, "DEFAULT_CONFIG", str(default))
    assert main.parse_args([]) == (DaemonConfig(), "info")  # absent: fine, the defaults
    default.parent.mkdir()
    write(default, "warm-pool = 0\nno-capture = true\n")
    config, _ = main.parse_args([])
    assert config.warm_pool == 0 and not (config.capture_network or config.capture_reads)
    assert main.parse_args(["--config", str(write(tmp_path / "other.toml", ""))])[0].warm_pool == 2


def test_print_config_round_trips(tmp_path: Path) -> None:
    every = write(
        tmp_path / "every.toml",
        f'socket = "{tmp_path}/a \\"quoted\\" sock"\n'
        'state-dir = "/var/lib/elsewhere"\n'
        'socket-mode = "0666"\n'
        "socket-group = 0\n"
        "default-timeout = 12.5\n"
        "max-timeout = 120\n"
        "memory-limit = 1048577\n"
        'pids-limit = 77\nscratch-size = "64M"\noutput-limit = "64k"\n'
        "max-concurrent = 3\nwarm-pool = 0\nkeep-changes-max = 10\n"
        "no-process-capture = true\nno-network-capture = true\nno-read-capture = true\n"
        f'no-capture = true\npolicy-dir = "{NEUTRAL_POLICY[1]}"\nlog-level = "error"\n',
    )
    first = print_config("--config", str(every))
    values = tomllib.loads(first)
    assert set(values) == flag_keys()  # every key, none commented out
    assert values["socket"] == f'{tmp_path}/a "quoted" sock' and values["output-limit"] == "64K"
    assert values["memory-limit"] == 1048577 and values["socket-group"] == 0
    again = write(tmp_path / "again.toml", first)
    second = print_config("--config", str(again))
    assert tomllib.loads(second) == values
    assert second.splitlines()[2:] == first.splitlines()[2:]  # all but the header naming the file
    assert main.parse_args(["--config", str(again)]) == main.parse_args(["--config", str(every)])


def test_the_example_config_lists_every_flag_with_its_default(tmp_path: Path, empty: Path) -> None:
    # As shipped, every line is commented out: the file parses and changes nothing.
    assert tomllib.loads(EXAMPLE.read_text()) == {}
    defaults = print_config("--config", str(empty))
    assert print_config("--config", str(EXAMPLE)).splitlines()[2:] == defaults.splitlines()[2:]
    # Uncommented, it sets every key, each (but the two that have no default) to its default.
    settings = re.findall(r"^#([a-z][a-z-]*) = .*$", EXAMPLE.read_text(), flags=re.M)
    assert sorted(settings) == sorted(flag_keys()), "packaging/airlockd.toml lists every flag once"
    uncommented = re.sub(r"^#(?=[a-z][a-z-]* = )", "", EXAMPLE.read_text(), flags=re.M)
    values = tomllib.loads(uncommented)
    unset = {"socket-group", "policy-dir"}
    assert {k for k in flag_keys() if f"# {k} is not set" in defaults} == unset
    kept = [line for line in uncommented.splitlines() if line.split(" = ")[0] not in unset]
    example = write(tmp_path / "example.toml", "\n".join(kept))
    assert print_config("--config", str(example)).splitlines()[2:] == defaults.splitlines()[2:]
    assert isinstance(values["socket-group"], str) and isinstance(values["policy-dir"], str)


BAD = [
    ('memroy-limit = "1G"\n', "memroy-limit", "unknown key"),
    ("config = '/etc/other.toml'\n", "config", "unknown key"),
    ("[daemon]\nsocket = '/tmp/s'\n", "daemon", "unknown key"),
    ('pids-limit = "many"\n', "pids-limit", "expected an integer"),
    ("pids-limit = 6.5\n", "pids-limit", "expected an integer"),
    ("memory-limit = true\n", "memory-limit", "expected a string or an integer"),
    ('memory-limit = "lots"\n', "memory-limit", "not a size: 'lots'"),
    ('socket-mode = "999"\n', "socket-mode", "not an octal mode"),
    ("socket-mode = 660\n", "socket-mode", "expected a string"),
    ('socket-group = "no-such-group-airlock"\n', "socket-group", "no such group"),
    ("max-timeout = 0\n", "max-timeout", "must be positive"),
    ('no-capture = "yes"\n', "no-capture", "expected true or false"),
    ("warm-pool = true\n", "warm-pool", "expected an integer"),
    ('log-level = "loud"\n', "log-level", "not one of debug, info, warning, error"),
    ("socket = 5\n", "socket", "expected a string"),
    ("memory-limit = \n", "", "not valid TOML"),
    ("default-timeout = 400\n", "default-timeout", "must not exceed max-timeout"),
]


@pytest.mark.parametrize(("content", "key", "why"), BAD)
def test_a_bad_file_is_one_clear_error(tmp_path: Path, content: str, key: str, why: str) -> None:
    cfg = write(tmp_path / "bad.toml", content)
    # Refused before anything starts (were it not, the daemon would stay in tmp_path).
    started = ("--socket", f"{tmp_path}/airlock.sock", "--state-dir", f"{tmp_path}/state")
    for args in (("--print-config",), started):
        result = airlockd("--config", str(cfg), *args)
        assert result.returncode == 2, result.stderr
        assert str(cfg) in result.stderr and key in result.stderr and why in result.stderr
        assert "Traceback" not in result.stderr and not result.stdout


def test_a_named_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    result = airlockd("--config", str(missing), "--print-config")
    assert result.returncode == 2 and not result.stdout
    assert f"{missing}: cannot read the configuration file: No such file" in result.stderr
    result = airlockd("--config", str(tmp_path), "--print-config")  # a directory
    assert result.returncode == 2 and str(tmp_path) in result.stderr
    assert "Traceback" not in result.stderr


# --- systemd packaging ------------------------------------------------------------------------


def test_install_service_needs_an_airlockd(tmp_path: Path) -> None:
    result = install_service(tmp_path, "install-service", f"AIRLOCKD={tmp_path}/nothing")
    assert result.returncode != 0 and "run 'make install' first" in result.stderr
    assert not (tmp_path / "etc").exists()


def test_the_unit_fits_the_daemon() -> None:
    settings = unit_settings(UNIT.read_text())
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # the policy reload
    assert settings["KillSignal"] == ["SIGTERM"] and settings["KillMode"] == ["mixed"]
    assert settings["Restart"] == ["on-failure"] and settings["Type"] == ["exec"]
    assert settings["RestartPreventExitStatus"] == ["2"]  # a bad configuration file
    # The daemon drains for up to max-timeout + 30 s (server.py) before it cleans up.
    assert int(settings["TimeoutStopSec"][0]) >= Limits().max_timeout_s + 30 + 20
    # Sandboxes show the real host and Execute writes the caller's directory for real.
    for hiding in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert hiding not in settings
    # The socket's directory as the daemon itself makes it (_peer.py: 0755).
    assert os.path.dirname(DaemonConfig().socket_path) == "/run/airlock"
    assert "d /run/airlock 0755 root root -" in TMPFILES.read_text().splitlines()
    assert settings["RuntimeDirectoryMode"] == ["0755"] and settings["StateDirectoryMode"] == [
        "0700"
    ]


def test_help_states_the_per_run_cap_on_kept_changes() -> None:
    from airlock.sandbox.plan import RunSpec

    parser, _ = main._parser()
    mib = RunSpec.keep_changes_bytes // 1024**2
    assert f"one dry run keeps at most {mib} MiB" in " ".join(parser.format_help().split())
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    assert f"one dry run keeps at most {mib} MiB" in " ".join(readme.split())
