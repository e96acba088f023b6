"""``airlock``: ask the daemon about a command from the shell.

::

    airlock validate [--socket PATH] [--cwd DIR] [--timeout S] [--json | -q] [--clean-env]
                     [--force-dry-run] -- COMMAND...     (in a terminal: offers to apply)
    airlock run [--cwd DIR] [--timeout S] [--token T] [--session ID] -- COMMAND...
                     (exits with the command's status; 126 denied, 125 asked)
    airlock apply ID | airlock discard ID | airlock approve ID [--session] [--special PATH]
    airlock capabilities [--socket PATH] [--json]
    airlock health [--socket PATH]
    airlock audit list [--since WHEN] [--until WHEN] [--verdict V] [--rule ID] [--session ID]
                       [--uid N] [--limit N] [--json]          (root only, as are the next two)
    airlock audit verify [--anchor SEQ:HASH] [--json]          (exit 0 intact, 1 problem)
    airlock audit export --jsonl [FILE]
    airlock policy lint|test|explain ...   (no daemon needed; see airlock.cli.policy)
    airlock hook claude|codex|gemini|cursor [--socket PATH] [--timeout S]
                     (an agent's pre-shell hook: JSON on stdin; see airlock.cli.hook)
    airlock hook install|uninstall claude|codex|gemini|cursor [--project DIR]
                     (add or remove that hook in the agent's settings; see airlock.cli.hookconf)
    airlock mcp [--socket PATH] [--http HOST:PORT]
                     (an MCP server of the daemon's tools; see airlock.cli.mcp)

Exit status: 0 allow (or healthy), 3 ask, 4 deny, 1 error, 2 usage error.

This module is the console entry point and only dispatches: a hook runs before every
shell command an agent issues, so its start-up is paid each time. Each group of actions
is imported only when asked for (``hook``: its one call over HTTP/2 with h2, no grpc;
``mcp``: the MCP SDK; ``policy``: the policy engine; the rest: :mod:`airlock.cli.commands`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from airlock.cli._exit import EXIT_ASK, EXIT_DENY, EXIT_ERROR, EXIT_OK, EXIT_USAGE

__all__ = ["EXIT_ASK", "EXIT_DENY", "EXIT_ERROR", "EXIT_OK", "EXIT_USAGE", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    given = list(argv) if argv is not None else sys.argv[1:]
    first = given[0] if given else ""
    if first == "hook":
        if given[1:2] and given[1] in ("install", "uninstall"):
            from airlock.cli.hookconf import main as hookconf_main

            return hookconf_main(given[1:])
        from airlock.cli.hook import main as hook_main

        return hook_main(given[1:])
    if first == "policy":
        from airlock.cli.policy import main as policy_main

        return policy_main(given[1:])
    if first == "mcp":
        from airlock.cli.mcp import main as mcp_main

        return mcp_main(given[1:])
    from airlock.cli.commands import main as commands_main

    return commands_main(given)


if __name__ == "__main__":
    sys.exit(main())
