"""``airlockd``: the Airlock daemon's command line and configuration file.

Every option but ``--config`` and ``--print-config`` is also a key of the TOML
configuration file, named as the option without its dashes and taking the same values
(``--memory-limit 2G`` is ``memory-limit = "2G"``, ``--no-capture`` is
``no-capture = true``). Precedence: built-in default < configuration file < option
given on the command line. The file is ``--config FILE``, else
``/etc/airlock/airlockd.toml`` when it exists; ``packaging/airlockd.toml`` lists every
key with its default.
"""

from __future__ import annotations

import argparse
import grp
import ipaddress
import logging
import os
import pwd
import re
import sys
import tomllib
from collections.abc import Callable

from airlock._version import __version__
from airlock.core.config import Approvers, DaemonConfig
from airlock.daemon import _log
from airlock.types import Limits

DEFAULT_CONFIG = "/etc/airlock/airlockd.toml"

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the file and key."""


def _size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([kmg]?)i?b?", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512M, 2G, 65536)")
    return int(match[1]) * _UNITS[match[2]]


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _percent(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a percentage from 1 to 100: {text}")
    return value


def _group(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such group: {text}") from None


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r} (example: 0660)")
    return mode


def _users(text: str) -> tuple[int, ...]:
    """A comma-separated list of users (names or uids), as uids; "" is none."""
    uids = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item.isdigit():
            uids.append(int(item))
            continue
        try:
            uids.append(pwd.getpwnam(item).pw_uid)
        except KeyError:
            raise argparse.ArgumentTypeError(f"no such user: {item}") from None
    return tuple(dict.fromkeys(uids))


def _groups(text: str) -> tuple[int, ...]:
    """A comma-separated list of groups (names or gids), as gids; "" is none."""
    return tuple(
        dict.fromkeys(_group(item) for item in filter(None, (p.strip() for p in text.split(","))))
    )


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"not a boolean: {text!r} (true or false)")
    return text.lower() == "true"


# The TOML types each kind of option accepts; the value then goes through the option's
# own conversion (str() of it), so the file takes exactly what the command line takes.
_TOML_TYPES: dict[Callable[[str], object] | None, tuple[type, ...]] = {
    None: (str,),
    int: (int,),
    _count: (int,),
    _percent: (int,),
    _positive: (int, float),
    _size: (str, int),
    _group: (str, int),
    _mode: (str,),
    _boolean: (bool,),
    _users: (str, int),
    _groups: (str, int),
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _name_address(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("=")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        sep = ""
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=ADDRESS, not {text!r}")
    return name.rstrip(".").lower(), address


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.Action]]:
    """The parser, and its settings (the options a configuration file may set) by key."""
    d = Limits()
    p = argparse.ArgumentParser(
        prog="airlockd",
        description="The Airlock daemon.",
        epilog="Every option but --config, --print-config and --test-resolve is also a key of the "
        'configuration file, spelled without the dashes (memory-limit = "2G", '
        "no-capture = true). An option given here wins over the file.",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML configuration file (default: {DEFAULT_CONFIG} if it exists)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration as TOML and exit",
    )
    p.add_argument("--version", action="version", version=f"airlockd {__version__}")
    p.add_argument(
        "--test-resolve",
        action="append",
        default=[],
        type=_name_address,
        metavar="NAME=ADDR",
        help="FOR TESTS ONLY: the egress relay resolves NAME to ADDR instead of asking the "
        "host's resolver (repeat it for more; the policy's address checks still apply)",
    )
    p.add_argument(
        "--new-audit-log",
        action="store_true",
        help="start even if the audit log does not reach the last head this daemon recorded "
        "(it was emptied, cut short or replaced): an operator starting a new log on purpose, "
        "for this start only (not a configuration file key; see README)",
    )
    s = p.add_argument_group("settings (each also a configuration file key)")

    def switch(flag: str, help: str) -> argparse.Action:
        # --no-x[=true|false]: "=false" undoes a configuration file's "no-x = true".
        return s.add_argument(
            flag, nargs="?", const=True, default=False, type=_boolean, metavar="BOOL", help=help
        )

    settings = [
        s.add_argument("--socket", default="/run/airlock/airlock.sock", help="public Unix socket"),
        s.add_argument("--state-dir", default="/var/lib/airlock", help="private state directory"),
        s.add_argument(
            "--socket-mode",
            type=_mode,
            default=0o660,
            help="socket permissions, octal (default 0660)",
        ),
        s.add_argument(
            "--socket-group",
            type=_group,
            default=None,
            help="group allowed to connect (name or gid)",
        ),
        s.add_argument(
            "--default-timeout",
            type=_positive,
            default=d.default_timeout_s,
            help="seconds, when a request sets none",
        ),
        s.add_argument(
            "--max-timeout",
            type=_positive,
            default=d.max_timeout_s,
            help="the largest timeout a request may ask for, seconds",
        ),
        s.add_argument("--memory-limit", type=_size, default=d.memory_bytes),
        s.add_argument("--pids-limit", type=int, default=d.pids),
        s.add_argument(
            "--scratch-size",
            type=_size,
            default=d.scratch_bytes,
            help="size of the copy-on-write layer of a sandbox",
        ),
        s.add_argument(
            "--output-limit",
            type=_size,
            default=d.output_bytes,
            help="bytes kept of stdout and of stderr",
        ),
        s.add_argument("--max-concurrent", type=int, default=d.concurrent_validations),
        s.add_argument(
            "--max-connections",
            type=_count,
            default=DaemonConfig.max_connections,
            help="connections the public socket holds at once (the last eighth are root's)",
        ),
        s.add_argument(
            "--max-connections-per-uid",
            type=_count,
            default=DaemonConfig.max_connections_per_uid,
            help="connections one non-root user may hold at once",
        ),
        s.add_argument(
            "--first-request-timeout",
            type=_positive,
            default=DaemonConfig.first_request_timeout_s,
            help="seconds a new connection has to make its first call before it is closed",
        ),
        s.add_argument(
            "--warm-pool",
            type=int,
            default=DaemonConfig.warm_pool,
            help="sandboxes kept prepared ahead of requests (0: prepare each on demand)",
        ),
        s.add_argument(
            "--warm-idle",
            type=_positive,
            default=DaemonConfig.warm_idle_s,
            metavar="SECONDS",
            help="retire a warm sandbox unused for this long (it holds the host's mounts; "
            "an unmount on the host retires them all at once)",
        ),
        s.add_argument(
            "--keep-changes-max",
            type=int,
            default=DaemonConfig.keep_changes_max,
            metavar="N",
            help="keep a dry run's changes for Apply only up to N changes (0: never keep them); "
            "past it, run such a command with Execute (airlock run) or in smaller steps",
        ),
        s.add_argument(
            "--keep-changes-quota",
            type=_size,
            default=DaemonConfig.keep_changes_quota_bytes,
            help="space the dry runs' changes kept for Apply may take in all; one dry run "
            "keeps at most 256 MiB (or its user's share, if less): past that its changes are "
            "not kept",
        ),
        s.add_argument(
            "--keep-changes-share-per-uid",
            type=_percent,
            default=DaemonConfig.keep_changes_share_per_uid,
            metavar="PERCENT",
            help="percent of --keep-changes-quota one user's kept changes may take; past it "
            "(or past the quota), a validation succeeds without keeping its changes",
        ),
        switch(
            "--no-process-capture",
            "do not record the processes a dry run starts (saves ~0.3 ms per exec)",
        ),
        switch(
            "--no-network-capture",
            "give dry runs an unroutable loopback-only network instead of the recording "
            "sinkhole (attempts fail at once and are not reported)",
        ),
        switch("--no-read-capture", "do not record opens of sensitive files"),
        switch(
            "--no-capture",
            "all three of --no-process-capture, --no-network-capture, --no-read-capture",
        ),
        s.add_argument(
            "--approvers",
            type=_users,
            default=Approvers.uids,
            metavar="USERS",
            help="users (names or uids, comma-separated) who may approve other users' asks, "
            "besides root, which always may (default: root only)",
        ),
        s.add_argument(
            "--approver-groups",
            type=_groups,
            default=Approvers.gids,
            metavar="GROUPS",
            help="groups (names or gids, comma-separated) whose members may approve other "
            "users' asks (default: none)",
        ),
        switch(
            "--allow-self-approval",
            "let a validation's own user approve it (off by default: an agent must not "
            "approve its own ask; turn it on only where the person and the agent are one user)",
        ),
        s.add_argument(
            "--policy-dir",
            default=None,
            help="policy directory (default: the shipped airlock/policy/default); reloaded on "
            "SIGHUP and when a file changes",
        ),
        s.add_argument(
            "--log-level", default="info", choices=["debug", "info", "warning", "error"]
        ),
    ]
    return p, {a.option_strings[0].removeprefix("--"): a for a in settings}


def load_config(path: str, settings: dict[str, argparse.Action]) -> dict[str, object]:
    """The settings a configuration file sets, converted, by option dest."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values: dict[str, object] = {}
    for key, raw in table.items():
        action = settings.get(key)
        if action is None:
            known = ", ".join(settings)
            raise ConfigError(f"{path}: unknown key {key!r} (the keys are: {known})")
        convert = action.type if callable(action.type) else None
        accepted = _TOML_TYPES[convert]
        if isinstance(raw, bool) != (bool in accepted) or not isinstance(raw, accepted):
            wanted = " or ".join(_TYPE_NAMES[t] for t in accepted)
            raise ConfigError(f"{path}: {key}: expected {wanted}, not {type(raw).__name__} {raw!r}")
        try:
            value = raw if convert is None or isinstance(raw, bool) else convert(str(raw))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise ConfigError(f"{path}: {key}: {exc}") from None
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise ConfigError(f"{path}: {key}: {value!r} is not one of {choices}")
        values[action.dest] = value
    return values


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(action: argparse.Action, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if action.type is _size and isinstance(value, int):
        for unit in ("G", "M", "K"):
            scale = _UNITS[unit.lower()]
            if value and value % scale == 0:
                return f'"{value // scale}{unit}"'
        return str(value)
    if action.type is _mode and isinstance(value, int):
        return f'"{value:04o}"'
    if isinstance(value, tuple):  # approvers, approver-groups: by number
        return _toml_string(",".join(map(str, value)))
    if isinstance(value, str):
        return _toml_string(value)
    return repr(value)  # int, float (30.0, inf): valid TOML as written


def render_config(
    args: argparse.Namespace, settings: dict[str, argparse.Action], source: str | None
) -> str:
    """The effective configuration as TOML: every key, usable as a configuration file."""
    lines = [
        "# airlockd's effective configuration (airlockd --print-config): built-in defaults,",
        f"# then {source or 'no configuration file'}, then the command line.",
    ]
    for key, action in settings.items():
        value = getattr(args, action.dest)
        if value is None:
            lines.append(f"# {key} is not set")  # TOML has no null
        else:
            lines.append(f"{key} = {_toml_value(action, value)}")
    return "\n".join(lines) + "\n"


def _load(argv: list[str] | None) -> tuple[DaemonConfig, str, str | None]:
    """(configuration, log level, the configuration file read or None); exits on errors."""
    p, settings = _parser()
    a = p.parse_args(argv)
    path: str | None = a.config
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    if path is not None:
        try:
            p.set_defaults(**load_config(path, settings))
        except ConfigError as exc:
            p.exit(2, f"airlockd: error: {exc}\n")
        a = p.parse_args(argv)  # again: the options given win over the file's values
    if a.default_timeout > a.max_timeout:
        where = f" (configuration file: {path})" if path else ""
        p.error(
            f"default-timeout ({a.default_timeout:g}) must not exceed "
            f"max-timeout ({a.max_timeout:g}){where}"
        )
    if a.print_config:
        sys.stdout.write(render_config(a, settings, path))
        p.exit(0)
    limits = Limits(
        default_timeout_s=a.default_timeout,
        max_timeout_s=a.max_timeout,
        memory_bytes=a.memory_limit,
        pids=a.pids_limit,
        scratch_bytes=a.scratch_size,
        output_bytes=a.output_limit,
        concurrent_validations=a.max_concurrent,
    )
    config = DaemonConfig(
        socket_path=a.socket,
        state_dir=a.state_dir,
        socket_mode=a.socket_mode,
        socket_gid=a.socket_group,
        warm_pool=max(0, a.warm_pool),
        warm_idle_s=a.warm_idle,
        policy_dir=a.policy_dir,
        trace_processes=not (a.no_process_capture or a.no_capture),
        capture_network=not (a.no_network_capture or a.no_capture),
        capture_reads=not (a.no_read_capture or a.no_capture),
        keep_changes=a.keep_changes_max > 0,
        keep_changes_max=max(a.keep_changes_max, 0),
        keep_changes_quota_bytes=a.keep_changes_quota,
        keep_changes_share_per_uid=a.keep_changes_share_per_uid,
        max_connections=a.max_connections,
        max_connections_per_uid=a.max_connections_per_uid,
        first_request_timeout_s=a.first_request_timeout,
        new_audit_log=a.new_audit_log,
        approvers=Approvers(
            uids=tuple(dict.fromkeys((0, *a.approvers))),
            gids=a.approver_groups,
            allow_self_approval=a.allow_self_approval,
        ),
        limits=limits,
        test_resolve=tuple(
            (name, tuple(addr for n, addr in a.test_resolve if n == name))
            for name in dict.fromkeys(n for n, _addr in a.test_resolve)
        ),
    )
    return config, a.log_level, path


def parse_args(argv: list[str] | None = None) -> tuple[DaemonConfig, str]:
    """The daemon's configuration and log level from the command line and the file.

    Exits (status 2) on a bad option or configuration file, and (status 0) after
    ``--print-config``, ``--help`` or ``--version``.
    """
    config, level, _ = _load(argv)
    return config, level


def main(argv: list[str] | None = None) -> int:
    config, level, path = _load(argv)
    _log.setup(level)
    logging.getLogger("airlock.daemon").info("configuration", extra={"file": path or ""})
    from airlock.daemon.server import serve  # after logging, so import errors are logged too

    try:
        return serve(config)
    except Exception:
        logging.getLogger("airlock.daemon").exception("fatal")
        return 1


if __name__ == "__main__":
    sys.exit(main())
