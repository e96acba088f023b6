"""``airlock``: ask the daemon about a command from the shell.

::

    airlock validate [--socket PATH] [--cwd DIR] [--timeout S] [--json] [--clean-env]
                     [--force-dry-run] -- COMMAND...
    airlock capabilities [--socket PATH] [--json]
    airlock health [--socket PATH]
    airlock policy lint|test|explain ...   (no daemon needed; see airlock.client.policy_cli)

Exit status: 0 allow (or healthy), 3 ask, 4 deny, 1 error, 2 usage error.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console

from airlock import types
from airlock._convert import capabilities_from_proto, validation_from_proto
from airlock._errors import AirlockError
from airlock._version import __version__
from airlock.client._client import DEFAULT_SOCKET_PATH, Client
from airlock.client._render import escape_controls, render_capabilities, render_validation

__all__ = ["EXIT_ASK", "EXIT_DENY", "EXIT_ERROR", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_ASK = 3
EXIT_DENY = 4

_EXIT_OF_VERDICT = {
    types.Verdict.ALLOW: EXIT_OK,
    types.Verdict.ASK: EXIT_ASK,
    types.Verdict.DENY: EXIT_DENY,
}


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number of seconds: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="airlock",
        description="Judge a shell command by a dry run in the Airlock daemon's sandbox.",
        epilog="Exit status: 0 allow, 3 ask, 4 deny, 1 error, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"airlock {__version__}")
    socket = argparse.ArgumentParser(add_help=False)
    socket.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help=f"the daemon's Unix socket (default: $AIRLOCK_SOCKET, else {DEFAULT_SOCKET_PATH})",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    validate = sub.add_parser(
        "validate",
        parents=[socket],
        help="dry-run a command and print the verdict",
        usage="airlock validate [-h] [--socket PATH] [--cwd DIR] [--timeout S] [--json]"
        " [--clean-env] [--force-dry-run] -- COMMAND...",
        description="Dry-run COMMAND (its words joined by spaces into one bash command line) "
        "in a throwaway sandbox and report what it did and the verdict.",
    )
    validate.add_argument(
        "--cwd", metavar="DIR", help="the directory to run in, also the workspace (default: .)"
    )
    validate.add_argument(
        "--timeout", metavar="S", type=_seconds, help="the command's time limit in seconds"
    )
    validate.add_argument("--json", action="store_true", help="print the response as protobuf JSON")
    validate.add_argument(
        "--clean-env",
        action="store_true",
        help="send no environment (default: this shell's environment)",
    )
    validate.add_argument(
        "--force-dry-run",
        action="store_true",
        help="run the dry run even when the static pass already denies the command",
    )
    validate.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command's words"
    )
    validate.set_defaults(subparser=validate)

    capabilities = sub.add_parser(
        "capabilities", parents=[socket], help="print what the host and daemon support"
    )
    capabilities.add_argument(
        "--json", action="store_true", help="print the response as protobuf JSON"
    )

    sub.add_parser("health", parents=[socket], help="check that the daemon is serving")
    # Listed for --help only: main() hands "policy ..." to airlock.client.policy_cli.
    sub.add_parser("policy", help="lint, test and explain policies (no daemon needed)")
    return parser


def _print_json(msg: Message) -> None:
    sys.stdout.write(json_format.MessageToJson(msg) + "\n")


def _environment(err: Console) -> dict[str, str]:
    env: dict[str, str] = {}
    for key, value in os.environ.items():
        try:
            key.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:
            # os.environ holds undecodable bytes as surrogates; the API carries UTF-8.
            err.print(
                f"airlock: warning: not passing {key.encode('utf-8', 'backslashreplace')!r}:"
                " not valid UTF-8",
                markup=False,
                highlight=False,
            )
            continue
        env[key] = value
    return env


def _validate(args: argparse.Namespace, out: Console, err: Console) -> int:
    command = " ".join(args.command)
    env = {} if args.clean_env else _environment(err)
    with Client(args.socket) as client:
        response = client.validate_raw(
            command,
            cwd=args.cwd,
            env=env,
            timeout=args.timeout,
            force_dry_run=args.force_dry_run,
        )
    validation = validation_from_proto(response)
    if args.json:
        _print_json(response)
    else:
        out.print(render_validation(validation))
    return _EXIT_OF_VERDICT.get(validation.verdict, EXIT_DENY)


def _capabilities(args: argparse.Namespace, out: Console, err: Console) -> int:
    with Client(args.socket) as client:
        response = client.capabilities_raw()
    if args.json:
        _print_json(response)
    else:
        out.print(render_capabilities(capabilities_from_proto(response)))
    return EXIT_OK


def _health(args: argparse.Namespace, out: Console, err: Console) -> int:
    with Client(args.socket) as client:
        serving = client.health()
    out.print("SERVING" if serving else "NOT_SERVING", markup=False, highlight=False)
    return EXIT_OK if serving else EXIT_ERROR


_ACTIONS: dict[str, Callable[[argparse.Namespace, Console, Console], int]] = {
    "validate": _validate,
    "capabilities": _capabilities,
    "health": _health,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    given = list(argv) if argv is not None else sys.argv[1:]
    if given[:1] == ["policy"]:
        from airlock.client.policy_cli import main as policy_main

        return policy_main(given[1:])
    parser = _parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
        if args.action == "validate":
            words: list[str] = args.command
            args.command = words[1:] if words[:1] == ["--"] else words
            if not args.command:
                args.subparser.error("a COMMAND is required, after --")
    except SystemExit as e:  # --help, --version or a usage error
        if e.code is None:
            return EXIT_OK
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    try:
        return _ACTIONS[args.action](args, out, err)
    except AirlockError as e:
        print(f"airlock: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("airlock: error: interrupted [CANCELLED]", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unexpected local failure: still one line
        print(f"airlock: error: {_one_line(f'{type(e).__name__}: {e}')} [CLIENT]", file=sys.stderr)
        return EXIT_ERROR


def _one_line(text: str) -> str:
    return escape_controls(" ".join(text.split()))


if __name__ == "__main__":
    sys.exit(main())
