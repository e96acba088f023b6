"""``airlock.cli._h2call``: the hook's one gRPC call over HTTP/2 without grpc.

Against a real grpc server (grpcio, in this process, on a temporary Unix socket) it must
interoperate: answers, large requests and answers (flow control), the daemon's status with
its message and ErrorInfo, its deadline. Against hostile or broken servers written here (a
Unix socket that sends garbage, closes early, resets the stream, sends GOAWAY, stalls or
trickles past the deadline, sends an oversized or malformed answer) every failure must be
one :class:`CallError` with the code grpc would give, and the hook's answer the agent's
blocking one. The real daemon is tests/daemon/test_hook.py's.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from airlock._errors import AirlockError, NotFound, Reason, Unavailable
from airlock.api import status as api_status
from airlock.cli import _h2call, hook
from airlock.cli._h2call import CallError, unary

DATA = Path(__file__).resolve().parents[2] / "data" / "hooks"


# --- a real grpc server -----------------------------------------------------------------


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"echo:" + request


def _big(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"x" * int(request)


def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort_with_status(api_status.to_rpc_status(NotFound("no validation val-9")))
    raise AssertionError("unreachable")


def _plain(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad: ünïcode 100% \x01")
    raise AssertionError("unreachable")


def _slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    end = time.monotonic() + 10
    while context.is_active() and time.monotonic() < end:
        time.sleep(0.01)
    return b"late"


@pytest.fixture
def grpc_socket(tmp_path: Path) -> Iterator[str]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", 8 * 1024 * 1024)],
    )
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(fn)
        for name, fn in {
            "Echo": _echo,
            "Big": _big,
            "Fail": _fail,
            "Plain": _plain,
            "Slow": _slow,
        }.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Svc", handlers),))
    path = str(tmp_path / "grpc.sock")
    server.add_insecure_port("unix:" + path)
    server.start()
    try:
        yield path
    finally:
        server.stop(None).wait()


def test_answer_from_grpc(grpc_socket: str) -> None:
    assert unary(grpc_socket, "/t.Svc/Echo", b"hello", 10) == b"echo:hello"
    assert unary(grpc_socket, "/t.Svc/Echo", b"", 10) == b"echo:"


def test_large_request_and_answer_go_through_flow_control(grpc_socket: str) -> None:
    # Both well over HTTP/2's initial 64 KiB window and 16 KiB frames.
    request = bytes(range(256)) * 4096  # 1 MiB
    assert unary(grpc_socket, "/t.Svc/Echo", request, 30) == b"echo:" + request
    assert unary(grpc_socket, "/t.Svc/Big", b"3000000", 30) == b"x" * 3_000_000


def test_answer_over_the_cap(grpc_socket: str) -> None:
    with pytest.raises(CallError) as e:
        unary(grpc_socket, "/t.Svc/Big", b"200000", 10, max_response=100_000)
    assert e.value.code == _h2call.RESOURCE_EXHAUSTED


def test_daemon_status_with_error_info(grpc_socket: str) -> None:
    with pytest.raises(CallError) as e:
        unary(grpc_socket, "/t.Svc/Fail", b"", 10)
    assert (e.value.code, e.value.message, e.value.from_server) == (5, "no validation val-9", True)
    err = hook.error_of_call(e.value, grpc_socket)
    assert type(err) is NotFound and err.reason == NotFound.default_reason


def test_daemon_status_without_details(grpc_socket: str) -> None:
    with pytest.raises(CallError) as e:
        unary(grpc_socket, "/t.Svc/Plain", b"", 10)
    assert (e.value.code, e.value.message) == (3, "bad: ünïcode 100% \x01")
    err = hook.error_of_call(e.value, grpc_socket)
    assert err.reason == "INVALID_ARGUMENT" and err.message == e.value.message


def test_unknown_method(grpc_socket: str) -> None:
    with pytest.raises(CallError) as e:
        unary(grpc_socket, "/t.Svc/Nope", b"", 10)
    assert e.value.code == 12  # UNIMPLEMENTED


def test_deadline_is_sent_and_kept(grpc_socket: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(CallError) as e:
        unary(grpc_socket, "/t.Svc/Slow", b"", 0.3)
    assert e.value.code == _h2call.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 8  # not the handler's 10 s: the deadline ended the call
    err = hook.error_of_call(e.value, grpc_socket)
    assert err.reason == "DEADLINE_EXCEEDED" and "did not answer in time" in err.message


def test_nobody_listening(tmp_path: Path) -> None:
    with pytest.raises(CallError) as e:
        unary(str(tmp_path / "none.sock"), "/t.Svc/Echo", b"", 5)
    assert e.value.code == _h2call.UNAVAILABLE and e.value.errno is not None
    err = hook.error_of_call(e.value, "/x.sock")
    assert isinstance(err, Unavailable) and err.reason == Reason.UNAVAILABLE
    assert err.message.startswith("cannot reach the Airlock daemon at /x.sock (")
    # A socket file with no listener: connection refused.
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()
    with pytest.raises(CallError) as e:
        unary(str(tmp_path / "dead.sock"), "/t.Svc/Echo", b"", 5)
    assert e.value.code == _h2call.UNAVAILABLE


def test_code_table_is_the_status_modules() -> None:
    by_number = {code.value[0]: cls for code, cls in api_status._CLASS_OF_CODE.items()}
    assert by_number == hook._class_of_code()
    assert hook._ERROR_DOMAIN == api_status.DOMAIN
    assert {c.value[0]: c.name for c in grpc.StatusCode} == dict(enumerate(_h2call.CODE_NAMES))


# --- hostile and broken servers ---------------------------------------------------------

Behaviour = Callable[[socket.socket], None]


def _h2_server(respond: Callable[[h2.connection.H2Connection, int], None]) -> Behaviour:
    """A server that speaks HTTP/2 until the request has ended, then ``respond``s."""

    def serve(sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if isinstance(event, h2.events.StreamEnded):
                    respond(conn, event.stream_id)
            sock.sendall(conn.data_to_send())

    return serve


def _headers(conn: h2.connection.H2Connection, sid: int, status: bytes = b"200") -> None:
    conn.send_headers(sid, [(b":status", status), (b"content-type", b"application/grpc")])


Respond = Callable[[h2.connection.H2Connection, int], None]


def _answer(
    message: bytes, *, flag: int = 0, length: int | None = None, status: bytes = b"0"
) -> Respond:
    def respond(conn: h2.connection.H2Connection, sid: int) -> None:
        _headers(conn, sid)
        n = len(message) if length is None else length
        conn.send_data(sid, struct.pack(">BI", flag, n) + message)
        conn.send_headers(sid, [(b"grpc-status", status)], end_stream=True)

    return respond


def _until_closed(sock: socket.socket) -> None:
    """Read (and drop) until the client closes, at most 3 s."""
    sock.settimeout(3)
    while sock.recv(65536):
        pass


def _garbage(sock: socket.socket) -> None:
    sock.recv(65536)
    sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    _until_closed(sock)


def _garbage_frame(sock: socket.socket) -> None:
    sock.recv(65536)
    # A SETTINGS frame whose length is not a multiple of 6.
    sock.sendall(struct.pack(">I", 5)[1:] + b"\x04\x00\x00\x00\x00\x00" + b"xxxxx")
    _until_closed(sock)


def _close_early(sock: socket.socket) -> None:
    sock.recv(65536)


def _stall(sock: socket.socket) -> None:
    _until_closed(sock)  # reads the request, never answers


def _trickle(sock: socket.socket) -> None:
    """Answers the handshake, then a PING every 50 ms, so that no single read times out."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    sock.settimeout(0.05)
    end = time.monotonic() + 3
    while time.monotonic() < end:
        try:
            data = sock.recv(65536)
            if not data:
                return
            conn.receive_data(data)
        except TimeoutError:
            pass
        conn.ping(b"12345678")
        sock.sendall(conn.data_to_send())


def _reset(code: int) -> Behaviour:
    return _h2_server(lambda conn, sid: conn.reset_stream(sid, error_code=code))


def _goaway(conn: h2.connection.H2Connection, sid: int) -> None:
    conn.close_connection(error_code=0, last_stream_id=0)


def _headers_then_goaway(conn: h2.connection.H2Connection, sid: int) -> None:
    _headers(conn, sid)
    conn.close_connection(error_code=2)


def _no_status(conn: h2.connection.H2Connection, sid: int) -> None:
    _headers(conn, sid)
    conn.send_data(sid, b"\0\0\0\0\0", end_stream=True)


def _http_503(conn: h2.connection.H2Connection, sid: int) -> None:
    _headers(conn, sid, b"503")
    conn.send_data(sid, b"", end_stream=True)


def _oversized_data(conn: h2.connection.H2Connection, sid: int) -> None:
    _headers(conn, sid)
    for _ in range(3):  # 3 x 16 KiB against a cap of 8 KiB
        conn.send_data(sid, b"\0" + b"x" * 16383)


HOSTILE: dict[str, tuple[Behaviour, int]] = {
    "HTTP/1.1 garbage": (_garbage, _h2call.INTERNAL),
    "malformed frame": (_garbage_frame, _h2call.INTERNAL),
    "closes early": (_close_early, _h2call.UNAVAILABLE),
    "stalls": (_stall, _h2call.DEADLINE_EXCEEDED),
    "trickles": (_trickle, _h2call.DEADLINE_EXCEEDED),
    "RST_STREAM internal error": (_reset(0x2), _h2call.INTERNAL),
    "RST_STREAM refused": (_reset(0x7), _h2call.UNAVAILABLE),
    "RST_STREAM cancel": (_reset(0x8), _h2call.CANCELLED),
    "GOAWAY": (_h2_server(_goaway), _h2call.UNAVAILABLE),
    "GOAWAY mid-answer": (_h2_server(_headers_then_goaway), _h2call.UNAVAILABLE),
    "oversized DATA": (_h2_server(_oversized_data), _h2call.RESOURCE_EXHAUSTED),
    "oversized length prefix": (
        _h2_server(_answer(b"abc", length=1 << 30)),
        _h2call.RESOURCE_EXHAUSTED,
    ),
    "length prefix too short": (_h2_server(_answer(b"abcdef", length=3)), _h2call.INTERNAL),
    "compressed": (_h2_server(_answer(b"abc", flag=1)), _h2call.INTERNAL),
    "no grpc-status": (_h2_server(_no_status), _h2call.INTERNAL),
    "bad grpc-status": (_h2_server(_answer(b"abc", status=b"zero")), _h2call.INTERNAL),
    "HTTP 503": (_h2_server(_http_503), _h2call.UNKNOWN),
}


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Callable[[Behaviour], str]]:
    """Serve ``behaviour`` on a fresh Unix socket (each connection, one at a time)."""
    stop = threading.Event()
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(behaviour: Behaviour) -> str:
        path = str(tmp_path / f"hostile{len(listeners)}.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(4)
        listener.settimeout(0.1)
        listeners.append(listener)

        def loop() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                # OSError, H2Error: the client gave up first.
                with conn, contextlib.suppress(OSError, h2.exceptions.H2Error):
                    behaviour(conn)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    try:
        yield start
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        for listener in listeners:
            listener.close()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_server_raises_call_error(name: str, hostile: Any) -> None:
    behaviour, code = HOSTILE[name]
    path = hostile(behaviour)
    t0 = time.monotonic()
    with pytest.raises(CallError) as e:
        unary(path, "/t.Svc/Echo", b"hello", 0.5, max_response=8192)
    assert e.value.code == code, str(e.value)
    assert time.monotonic() - t0 < 5  # the deadline bounds even a trickling server


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("agent", hook.AGENTS)
def test_hostile_server_gets_the_blocking_answer(name: str, agent: str, hostile: Any) -> None:
    path = hostile(HOSTILE[name][0])
    data = json.loads((DATA / f"{agent}.json").read_text())["input"]
    if agent == "cursor":
        data["command"], data["cwd"] = "ls", "/tmp"
    else:
        data["tool_input"]["command"], data["cwd"] = "ls", "/tmp"
    answer = hook.handle(agent, json.dumps(data), hook.daemon_validator(path, 0.5))
    assert answer.exit_code == 0 and answer.stderr == ""
    if agent in ("claude", "codex"):
        out = json.loads(answer.stdout)["hookSpecificOutput"]
        decision, reason = out["permissionDecision"], out["permissionDecisionReason"]
    elif agent == "gemini":
        out = json.loads(answer.stdout)
        decision, reason = out["decision"], out["reason"]
    else:
        out = json.loads(answer.stdout)
        decision, reason = out["permission"], out["agent_message"]
    assert decision == "deny"
    assert reason.startswith("Airlock could not judge this, so it is blocked: ")
    assert "\n" not in reason and reason.endswith("]")


def test_answer_that_is_not_a_validate_response(hostile: Any) -> None:
    """A well-formed call whose message is not protobuf: an AirlockError, so the hook
    blocks."""
    path = hostile(_h2_server(_answer(b"\xff\xff\xff")))
    assert unary(path, "/t.Svc/Echo", b"", 5) == b"\xff\xff\xff"
    validate = hook.daemon_validator(path, 5)
    req = hook.Request(command="ls", cwd="/tmp")
    with pytest.raises(AirlockError) as e:
        validate(req)
    assert e.value.reason == "INTERNAL"
