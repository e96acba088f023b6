"""``airlock mcp [--socket PATH] [--http HOST:PORT]``: the daemon's tools for an MCP client.

An MCP server (the official MCP Python SDK, ``pip install 'airlock-daemon[mcp]'``) that
speaks for the user who starts it: every call goes to the daemon as that user, with this
process's environment (the client's default), like ``airlock validate``. stdio by default
(the client starts ``airlock mcp`` itself); ``--http HOST:PORT`` serves streamable HTTP at
``http://HOST:PORT/mcp`` instead, on loopback unless ``--allow-remote``. Over HTTP there is
no SO_PEERCRED, so every request is checked against the kernel's socket tables
(``airlock.cli._tcp_peer``): only a connection whose client socket belongs to this server's own
uid is served (root's server: only root's processes); any other local user's is refused with
403 before any MCP handling. With ``--allow-remote`` a client on another host is not checked
(there is no authentication): anyone who can reach the port from another host acts as this
user.

Tools (annotations in brackets, as the MCP specification defines them):

``validate``  dry-run a command and return the verdict, summary, findings and changes
              [read-only: the host is not changed; open world: a dry run may fetch from
              registries the policy grants]
``run``       run a command for real under the policy (Execute), its output streamed as
              progress notifications [destructive, open world]
``apply``     write a validation's dry-run changes to the host [destructive; idempotent:
              a second apply of the same id is answered from the first and writes nothing]
``discard``   drop the changes a validation kept [destructive, idempotent]
``recent_validations``  the validations made through this server, newest first
              [read-only]

No tool approves: an ASK is answered with the ``airlock approve ID`` command a person
(an approver, not the agent's user) must run. A session approval (``--session``) covers
later ``run`` calls of this server, whose session id the answers give.
"""

# No `from __future__ import annotations` here: the SDK reads the tools' annotations with
# typing.get_type_hints, which cannot see names imported inside build_server.
import argparse
import collections
import ipaddress
import os
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airlock import types

if TYPE_CHECKING:
    from airlock.client import Client

__all__ = ["build_server", "main"]

_MAX_TEXT = 16 * 1024  # output bytes returned inline per stream (the rest is counted)
_MAX_CHANGES = 100  # changes listed per validation
_RECENT = 50  # validations remembered
_VERDICT = {types.Verdict.ALLOW: "allow", types.Verdict.ASK: "ask", types.Verdict.DENY: "deny"}


def _text(data: bytes, limit: int = _MAX_TEXT) -> str:
    cut = data[:limit].decode("utf-8", "replace")
    return cut + (f"\n[... {len(data) - limit} more bytes]" if len(data) > limit else "")


def _next_step(v: types.Validation, session_id: str) -> str:
    if v.verdict is types.Verdict.ALLOW:
        if v.changes_digest:
            return (
                f"Allowed. Call apply with validation_id {v.validation_id} to write exactly "
                "these changes, or run to run the command for real."
            )
        return "Allowed. Call run to run the command for real."
    if v.verdict is types.Verdict.ASK:
        return (
            "A person must approve this first; this server cannot approve. Ask them to run "
            f"`airlock approve {v.validation_id}` (or with --session to cover session "
            f"{session_id}), then call apply, or run with the approval token they give you."
        )
    return "Denied by the policy. Do not run it; change the approach."


def _validation(v: types.Validation, session_id: str) -> dict[str, Any]:
    changes = [
        {"kind": c.kind.name.lower(), "path": os.fsdecode(c.path)} for c in v.changes[:_MAX_CHANGES]
    ]
    return {
        "validation_id": v.validation_id,
        "verdict": _VERDICT.get(v.verdict, "deny"),
        "summary": v.summary,
        "findings": [
            {
                "rule_id": f.rule_id,
                "verdict": _VERDICT.get(f.verdict, "deny"),
                "severity": f.severity.name.lower(),
                "message": f.message,
            }
            for f in v.findings
        ],
        "dry_run": v.sandboxed,
        "exit_code": v.exit_code,
        "stdout": _text(v.stdout),
        "stderr": _text(v.stderr),
        "changes": changes,
        "changes_total": len(v.changes),
        "changes_truncated": v.changes_truncated or len(v.changes) > _MAX_CHANGES,
        "changes_kept": bool(v.changes_digest),
        "changes_not_kept": v.changes_not_kept,
        "session_id": session_id,
        "next_step": _next_step(v, session_id),
    }


def build_server(client: "Client") -> Any:
    """The MCP server (an ``mcp.server.mcpserver.MCPServer``) that calls the daemon with
    ``client`` (which the caller closes)."""
    import anyio
    import anyio.to_thread
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.types import ToolAnnotations

    from airlock._errors import AirlockError
    from airlock._version import __version__

    session_id = f"mcp-{uuid.uuid4().hex[:16]}"
    recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=_RECENT)
    lock = threading.Lock()
    server = MCPServer(
        name="airlock",
        title="Airlock",
        version=__version__,
        instructions=(
            "Judge shell commands before they run. Call validate first: it dry-runs the "
            "command in a throwaway sandbox and returns the verdict (allow, ask, deny), what "
            "the command would change, and the policy's findings. Apply an allowed "
            "validation's changes with apply, or run the command for real with run. An ask "
            "needs a person's approval (airlock approve ID); no tool here can approve."
        ),
    )

    def agent_of(ctx: Any) -> types.AgentContext:
        name, version = "mcp", ""
        try:
            info = ctx.session.client_params.client_info
            name, version = f"mcp:{info.name}", info.version or ""
        except AttributeError:
            pass
        return types.AgentContext(agent_name=name[:64], agent_version=version[:64],
                                  session_id=session_id)  # fmt: skip

    def failed(e: AirlockError) -> ToolError:
        return ToolError(f"{e.message} [{e.reason}]")

    def remember(v: types.Validation, command: str, cwd: str) -> None:
        with lock:
            recent.appendleft(
                {
                    "validation_id": v.validation_id,
                    "command": command,
                    "cwd": cwd,
                    "verdict": _VERDICT.get(v.verdict, "deny"),
                    "summary": v.summary,
                    "changes_kept": bool(v.changes_digest),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "state": "validated",
                }
            )

    def mark(validation_id: str, state: str) -> None:
        with lock:
            for r in recent:
                if r["validation_id"] == validation_id:
                    r["state"] = state

    @server.tool(
        title="Validate a shell command (dry run)",
        annotations=ToolAnnotations(
            read_only_hint=True, destructive_hint=False, idempotent_hint=False,
            open_world_hint=True,
        ),
    )  # fmt: skip
    async def validate(
        command: str, cwd: str, timeout_s: float | None = None, ctx: Context | None = None
    ) -> dict[str, Any]:
        """Dry-run `bash -c COMMAND` in a throwaway sandbox of directory CWD (an absolute
        path; the workspace) and return Airlock's verdict: allow, ask (a person must
        approve) or deny, with a summary of what it did, the findings and the changes.
        Nothing on the host changes; the changes are kept for apply."""
        try:
            v = await anyio.to_thread.run_sync(
                lambda: client.validate(
                    command, cwd=cwd, timeout=timeout_s,
                    session_id=session_id, agent=agent_of(ctx),
                )
            )  # fmt: skip
        except AirlockError as e:
            raise failed(e) from None
        remember(v, command, cwd)
        return _validation(v, session_id)

    @server.tool(
        title="Run a shell command for real (under the policy)",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=False,
            open_world_hint=True,
        ),
    )  # fmt: skip
    async def run(
        command: str,
        cwd: str,
        timeout_s: float | None = None,
        approval_token: str = "",
        ctx: Context | None = None,
    ) -> dict[str, Any]:
        """Run `bash -c COMMAND` for real in CWD (only CWD is writable) if the policy
        allows it; its output is streamed as progress notifications and returned (the
        first 16 KiB of each stream). A command the policy asks about needs the
        approval_token a person got from `airlock approve ID`, or a session approval;
        a denied command is refused."""
        send, receive = anyio.create_memory_object_stream[Any](64)
        stream_box: list[Any] = []

        def pump() -> None:
            try:
                s = client.execute(
                    command, cwd=cwd, timeout=timeout_s,
                    approval_token=approval_token, session_id=session_id, agent=agent_of(ctx),
                )  # fmt: skip
                stream_box.append(s)
                for event in s:
                    anyio.from_thread.run(send.send, event)
            except BaseException as e:  # handed to the async side, raised there
                anyio.from_thread.run(send.send, e)
            finally:
                anyio.from_thread.run(send.aclose)

        out = {1: bytearray(), 2: bytearray()}
        total = {1: 0, 2: 0}
        result: dict[str, Any] = {"session_id": session_id}
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, pump)
            try:
                async with receive:
                    async for event in receive:
                        if isinstance(event, BaseException):
                            error = event  # raised below, outside the task group
                        elif isinstance(event, types.ExecStarted):
                            result["execution_id"] = event.execution_id
                            result["verdict"] = _VERDICT.get(event.verdict, "deny")
                            result["authorization"] = event.authorization
                        elif isinstance(event, types.ExecOutput):
                            buf = out.get(event.stream)
                            if buf is None:
                                continue
                            total[event.stream] += len(event.data)
                            if len(buf) < _MAX_TEXT:
                                buf += event.data[: _MAX_TEXT - len(buf)]
                            if ctx is not None:
                                await ctx.report_progress(
                                    total[1] + total[2],
                                    None,
                                    event.data[:4096].decode("utf-8", "replace"),
                                )
                        elif isinstance(event, types.ExecFinished):
                            result["exit_code"] = event.exit_code
                            result["signal"] = event.signal
                            result["termination"] = event.termination.name.lower()
                            result["wall_s"] = round(event.wall_s, 3)
            except BaseException:
                for s in stream_box:
                    s.cancel()  # the caller went away: kill the command's processes
                raise
        if isinstance(error, AirlockError):
            raise failed(error)
        if error is not None:
            raise error
        if "exit_code" not in result:
            raise ToolError("the daemon's stream ended before the command finished")
        for n, name in ((1, "stdout"), (2, "stderr")):
            result[name] = out[n].decode("utf-8", "replace")
            result[f"{name}_bytes"] = total[n]
        return result

    @server.tool(
        title="Apply a validation's changes to the host",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=True,
            open_world_hint=False,
        ),
    )  # fmt: skip
    async def apply(validation_id: str) -> dict[str, Any]:
        """Write exactly the dry-run changes of VALIDATION_ID to the host (files created,
        changed and deleted as the dry run did). An allowed validation, or an asked one a
        person approved; a second apply of the same id writes nothing (replayed: true)."""
        try:
            outcome = await anyio.to_thread.run_sync(lambda: client.apply(validation_id))
        except AirlockError as e:
            raise failed(e) from None
        mark(validation_id, "applied")
        return {
            "validation_id": validation_id,
            "applied_paths": [os.fsdecode(p) for p in outcome.applied_paths[:_MAX_CHANGES]],
            "applied_total": len(outcome.applied_paths),
            "bytes_written": outcome.bytes_written,
            # Applied before (by this id): nothing was written again.
            "replayed": outcome.replayed,
        }

    @server.tool(
        title="Discard a validation's kept changes",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=True,
            open_world_hint=False,
        ),
    )  # fmt: skip
    async def discard(validation_id: str) -> dict[str, Any]:
        """Drop the changes VALIDATION_ID kept for apply; the host is not touched."""
        try:
            await anyio.to_thread.run_sync(lambda: client.discard(validation_id))
        except AirlockError as e:
            raise failed(e) from None
        mark(validation_id, "discarded")
        return {"validation_id": validation_id, "discarded": True}

    @server.tool(
        title="List recent validations",
        annotations=ToolAnnotations(
            read_only_hint=True, destructive_hint=False, idempotent_hint=True,
            open_world_hint=False,
        ),
    )  # fmt: skip
    async def recent_validations(limit: int = 20) -> dict[str, Any]:
        """The validations made through this server (its session), newest first: id,
        command, verdict, summary, and whether they were applied or discarded here."""
        with lock:
            rows = list(recent)[: max(0, min(limit, _RECENT))]
        return {"session_id": session_id, "validations": rows}

    return server


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}") from None
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"not a port: {port!r}")
    return host, number


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve_http(server: Any, host: str, port: int, remote: bool) -> None:
    """Streamable HTTP at http://HOST:PORT/mcp, behind the same-user check."""
    import anyio
    import uvicorn

    from airlock.cli._tcp_peer import SameUserOnly

    app = SameUserOnly(server.streamable_http_app(host=host), remote=remote)
    config = uvicorn.Config(app, host=host, port=port, log_level=server.settings.log_level.lower())
    anyio.run(uvicorn.Server(config).serve)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="airlock mcp",
        description="Serve the daemon's tools (validate, run, apply, discard, "
        "recent_validations) to an MCP client, as the user who runs it. No tool approves.",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="the daemon's Unix socket (default: $AIRLOCK_SOCKET, else the system socket)",
    )
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        type=_host_port,
        default=None,
        help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio "
        "(PORT alone: on 127.0.0.1); only your own processes are served: a connection from "
        "another local user's process is refused (403)",
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow --http on an address other than loopback. DANGEROUS: there is no "
        "authentication, and any process on any host that can reach the port acts as you "
        "(local users are still checked)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``airlock mcp`` with ``argv`` (the words after ``mcp``); the exit status."""
    try:
        args = _parser().parse_args(list(argv) if argv is not None else sys.argv[1:])
    except SystemExit as e:
        return 0 if e.code in (0, None) else 2
    if args.http and not _is_loopback(args.http[0]) and not args.allow_remote:
        print(
            f"airlock: error: --http {args.http[0]} is not a loopback address; the server has "
            "no authentication (add --allow-remote if that is meant)",
            file=sys.stderr,
        )
        return 2
    from airlock.client import Client

    client = Client(args.socket)
    try:
        server = build_server(client)
    except ImportError as e:
        client.close()
        print(
            f"airlock: error: airlock mcp needs the MCP SDK ({e}): "
            "pip install 'airlock-daemon[mcp]'",
            file=sys.stderr,
        )
        return 1
    try:
        if args.http:
            host, port = args.http
            print(
                f"airlock: MCP over streamable HTTP at http://{host}:{port}/mcp, acting as uid "
                f"{os.geteuid()}: only this user's processes on this host are served",
                file=sys.stderr,
            )
            if args.allow_remote and not _is_loopback(host):
                print(
                    "airlock: warning: --allow-remote: there is no authentication; anyone on "
                    f"another host who can reach {host}:{port} acts as uid {os.geteuid()}",
                    file=sys.stderr,
                )
            _serve_http(server, host, port, remote=not _is_loopback(host))
        else:
            server.run("stdio")
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
    return 0
