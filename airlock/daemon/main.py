"""``airlockd``: the Airlock daemon's command line."""

from __future__ import annotations

import argparse
import grp
import logging
import re
import sys

from airlock._version import __version__
from airlock.core.config import DaemonConfig
from airlock.daemon import _log
from airlock.types import Limits

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


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


def _group(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such group: {text}") from None


def parse_args(argv: list[str] | None = None) -> tuple[DaemonConfig, str]:
    d = Limits()
    p = argparse.ArgumentParser(prog="airlockd", description="The Airlock daemon.")
    p.add_argument("--socket", default="/run/airlock/airlock.sock", help="public Unix socket")
    p.add_argument("--state-dir", default="/var/lib/airlock", help="private state directory")
    p.add_argument(
        "--socket-mode",
        type=lambda s: int(s, 8),
        default=0o660,
        help="socket permissions, octal (default 0660)",
    )
    p.add_argument(
        "--socket-group", type=_group, default=None, help="group allowed to connect (name or gid)"
    )
    p.add_argument(
        "--default-timeout",
        type=_positive,
        default=d.default_timeout_s,
        help="seconds, when a request sets none",
    )
    p.add_argument(
        "--max-timeout",
        type=_positive,
        default=d.max_timeout_s,
        help="the largest timeout a request may ask for, seconds",
    )
    p.add_argument("--memory-limit", type=_size, default=d.memory_bytes)
    p.add_argument("--pids-limit", type=int, default=d.pids)
    p.add_argument(
        "--scratch-size",
        type=_size,
        default=d.scratch_bytes,
        help="size of the copy-on-write layer of a sandbox",
    )
    p.add_argument(
        "--output-limit",
        type=_size,
        default=d.output_bytes,
        help="bytes kept of stdout and of stderr",
    )
    p.add_argument("--max-concurrent", type=int, default=d.concurrent_validations)
    p.add_argument(
        "--warm-pool",
        type=int,
        default=DaemonConfig.warm_pool,
        help="sandboxes kept prepared ahead of requests (0: prepare each on demand)",
    )
    p.add_argument(
        "--no-process-capture",
        action="store_true",
        help="do not record the processes a dry run starts (saves ~0.3 ms per exec)",
    )
    p.add_argument(
        "--keep-changes-max",
        type=int,
        default=DaemonConfig.keep_changes_max,
        metavar="N",
        help="keep a dry run's changes for Apply only up to N changes (0: never keep them)",
    )
    p.add_argument(
        "--no-network-capture",
        action="store_true",
        help="give dry runs an unroutable loopback-only network instead of the recording "
        "sinkhole (attempts fail at once and are not reported)",
    )
    p.add_argument(
        "--no-read-capture",
        action="store_true",
        help="do not record opens of sensitive files",
    )
    p.add_argument(
        "--no-capture",
        action="store_true",
        help="all three of --no-process-capture, --no-network-capture, --no-read-capture",
    )
    p.add_argument(
        "--policy-dir",
        default=None,
        help="policy directory (default: the shipped policies/default); reloaded on SIGHUP "
        "and when a file changes",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"airlockd {__version__}")
    a = p.parse_args(argv)
    if a.default_timeout > a.max_timeout:
        p.error("--default-timeout must not exceed --max-timeout")
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
        policy_dir=a.policy_dir,
        trace_processes=not (a.no_process_capture or a.no_capture),
        capture_network=not (a.no_network_capture or a.no_capture),
        capture_reads=not (a.no_read_capture or a.no_capture),
        keep_changes=a.keep_changes_max > 0,
        keep_changes_max=max(a.keep_changes_max, 0),
        limits=limits,
    )
    return config, a.log_level


def main(argv: list[str] | None = None) -> int:
    config, level = parse_args(argv)
    _log.setup(level)
    from airlock.daemon.server import serve  # after logging, so import errors are logged too

    try:
        return serve(config)
    except Exception:
        logging.getLogger("airlock.daemon").exception("fatal")
        return 1


if __name__ == "__main__":
    sys.exit(main())
