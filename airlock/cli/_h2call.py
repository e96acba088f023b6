"""One unary gRPC call over HTTP/2 on a Unix socket, without grpc.

``airlock hook`` runs before every shell command an agent issues and makes exactly one
call (Validate). ``import grpc`` alone costs it about as much as the rest of its start-up
(docs/performance.md section 11), so this module speaks the gRPC wire protocol itself on
top of ``h2`` (a pure-Python HTTP/2 state machine: framing, HPACK, flow control, SETTINGS
and PING acknowledgements), which imports in a few milliseconds. Why this and not grpc,
and what it gives up (no retries, keepalive, compression, channel reuse): docs/decisions.md
§25.

The exchange: connect, the client preface and SETTINGS, one HEADERS (``POST``, the method's
path, ``content-type: application/grpc``, ``te: trailers``, ``grpc-timeout``), one
length-prefixed message in DATA with END_STREAM; then the response HEADERS, DATA (one
length-prefixed message, at most ``max_response`` bytes) and trailers (``grpc-status``,
``grpc-message``, ``grpc-status-details-bin``). The whole exchange has one deadline,
enforced as the socket's timeout before each blocking step.

Every failure raises :class:`CallError` carrying the gRPC status code that grpc itself
would have reported for it (UNAVAILABLE when the daemon cannot be reached or goes away,
DEADLINE_EXCEEDED past the deadline, INTERNAL for a malformed exchange, RESOURCE_EXHAUSTED
for an answer over the cap), or the daemon's own status with its message and details.
"""

from __future__ import annotations

import base64
import socket
import struct
import time
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions

__all__ = ["CODE_NAMES", "CallError", "unary"]

# gRPC status codes (the wire protocol's numbers) by name, for messages and reasons.
CODE_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
CANCELLED, UNKNOWN, DEADLINE_EXCEEDED = 1, 2, 4
RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE = 8, 13, 14

DEFAULT_MAX_RESPONSE = 64 * 1024 * 1024
_STREAM = 1  # the one stream of the connection
_RECV_BYTES = 256 * 1024
# HTTP/2 RST_STREAM codes grpc maps to a status of their own (others: INTERNAL).
_RST_CODES = {0x7: UNAVAILABLE, 0x8: CANCELLED, 0xB: RESOURCE_EXHAUSTED}


class CallError(Exception):
    """The call failed. ``code`` is a gRPC status code; ``message`` the daemon's
    ``grpc-message`` (or what went wrong on the way); ``details`` the daemon's
    ``grpc-status-details-bin`` (a serialized ``google.rpc.Status``), if any; ``errno`` the
    socket error when the daemon could not be reached; ``from_server`` whether the status
    came from the daemon's trailers rather than from this side."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        details: bytes = b"",
        errno: int | None = None,
        from_server: bool = False,
    ) -> None:
        super().__init__(f"{code_name(code)}: {message}")
        self.code = code
        self.message = message
        self.details = details
        self.errno = errno
        self.from_server = from_server


def code_name(code: int) -> str:
    """The name of gRPC status ``code`` (``UNKNOWN`` for a number outside the table)."""
    return CODE_NAMES[code] if 0 <= code < len(CODE_NAMES) else "UNKNOWN"


def _timeout_header(seconds: float) -> bytes:
    """``grpc-timeout``: at most 8 digits and a unit."""
    ms = max(1, int(seconds * 1000))
    return f"{ms}m".encode() if ms < 10**8 else f"{min(int(seconds), 10**8 - 1)}S".encode()


def _b64(value: bytes) -> bytes:
    try:
        return base64.b64decode(value + b"=" * (-len(value) % 4), validate=False)
    except ValueError:
        return b""


class _Call:
    """The state of the one exchange; :meth:`run` returns the response message."""

    def __init__(self, sock: socket.socket, deadline: float, max_response: int) -> None:
        self.sock = sock
        self.deadline = deadline
        self.max_response = max_response
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.headers: dict[bytes, bytes] | None = None
        self.trailers: dict[bytes, bytes] | None = None
        self.body = bytearray()
        self.first: bytearray | None = bytearray()  # the first frame header, until checked

    def _check_preface(self, data: bytes) -> None:
        """The server's first frame must be SETTINGS (RFC 9113 3.4). h2 would wait for the
        whole of a frame whatever length its header claims, so something that is not
        HTTP/2 (an HTTP/1.1 answer, garbage) is refused here at once, not at the deadline."""
        assert self.first is not None
        self.first += data[: 9 - len(self.first)]
        if len(self.first) < 9:
            return
        length, kind, flags, stream = struct.unpack(">IBBI", b"\0" + bytes(self.first))
        if kind != 0x4 or flags & 0x1 or stream != 0 or length % 6 or length > 16384:
            raise CallError(INTERNAL, "the daemon's answer is not HTTP/2 (no SETTINGS first)")
        self.first = None

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise CallError(DEADLINE_EXCEEDED, "deadline exceeded")
        return left

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.sock.settimeout(self._remaining())
            self.sock.sendall(out)

    def run(self, method: str, request: bytes, timeout: float) -> bytes:
        conn = self.conn
        conn.initiate_connection()
        conn.send_headers(
            _STREAM,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", method.encode()),
                (b":authority", b"localhost"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                (b"grpc-timeout", _timeout_header(timeout)),
                (b"user-agent", b"airlock-hook"),
            ],
        )
        pending = memoryview(struct.pack(">BI", 0, len(request)) + request)
        sent = 0
        while True:
            # Send as much of the request as the peer's flow-control window lets through.
            while sent < len(pending):
                n = min(
                    len(pending) - sent,
                    conn.local_flow_control_window(_STREAM),
                    conn.max_outbound_frame_size,
                )
                if n <= 0:
                    break  # wait for a WINDOW_UPDATE
                end = sent + n == len(pending)
                conn.send_data(_STREAM, pending[sent : sent + n].tobytes(), end_stream=end)
                sent += n
            self._flush()
            self.sock.settimeout(self._remaining())
            data = self.sock.recv(_RECV_BYTES)
            if not data:
                raise CallError(UNAVAILABLE, "the daemon closed the connection before answering")
            if self.first is not None:
                self._check_preface(data)
            try:
                events = conn.receive_data(data)
            except (h2.exceptions.H2Error, ValueError, LookupError) as e:
                # hpack and hyperframe errors are ValueErrors or h2's own; a bad header
                # table index is a LookupError.
                raise CallError(INTERNAL, f"malformed HTTP/2 from the daemon ({e})") from None
            for event in events:
                if self._event(event):
                    return self._result()

    def _event(self, event: h2.events.Event) -> bool:
        """Handle one event; True when the response is complete."""
        sid = getattr(event, "stream_id", _STREAM)
        if sid != _STREAM and not isinstance(event, h2.events.ConnectionTerminated):
            return False  # nothing else is open (a pushed stream is refused by h2)
        if isinstance(event, h2.events.ResponseReceived):
            self.headers = dict(event.headers)
            status = self.headers.get(b":status", b"")
            if status != b"200":
                raise CallError(UNKNOWN, f"the daemon answered HTTP status {status.decode()!r}")
            if not self.headers.get(b"content-type", b"").startswith(b"application/grpc"):
                raise CallError(UNKNOWN, "the daemon's answer is not gRPC (content-type)")
        elif isinstance(event, h2.events.DataReceived):
            if self.headers is None:  # pragma: no cover - h2 refuses DATA before HEADERS
                raise CallError(INTERNAL, "DATA before HEADERS")
            self.body += event.data
            if len(self.body) > self.max_response + 5:
                raise CallError(
                    RESOURCE_EXHAUSTED,
                    f"the daemon's answer is larger than {self.max_response} bytes",
                )
            self.conn.acknowledge_received_data(event.flow_controlled_length, _STREAM)
        elif isinstance(event, h2.events.TrailersReceived):
            self.trailers = dict(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            return True
        elif isinstance(event, h2.events.StreamReset):
            code = _RST_CODES.get(int(event.error_code), INTERNAL)
            raise CallError(code, f"the daemon reset the call (RST_STREAM {event.error_code!s})")
        elif isinstance(event, h2.events.ConnectionTerminated):
            raise CallError(
                UNAVAILABLE,
                f"the daemon closed the connection (GOAWAY {event.error_code!s})",
            )
        return False

    def _result(self) -> bytes:
        # A trailers-only answer (an error before any message) has grpc-status in HEADERS.
        trailers = self.trailers if self.trailers is not None else (self.headers or {})
        raw_status = trailers.get(b"grpc-status")
        if raw_status is None:
            raise CallError(INTERNAL, "the daemon's answer has no grpc-status")
        try:
            code = int(raw_status)
        except ValueError:
            raise CallError(INTERNAL, f"bad grpc-status {raw_status!r}") from None
        if code != 0:
            message = unquote(trailers.get(b"grpc-message", b"").decode("utf-8", "replace"))
            details = _b64(trailers.get(b"grpc-status-details-bin", b""))
            raise CallError(code, message, details=details, from_server=True)
        body = bytes(self.body)
        if len(body) < 5:
            raise CallError(INTERNAL, "the daemon's answer has no message")
        compressed, length = struct.unpack(">BI", body[:5])
        if compressed:
            raise CallError(INTERNAL, "the daemon's answer is compressed (not asked for)")
        if length > self.max_response:
            raise CallError(
                RESOURCE_EXHAUSTED, f"the daemon's answer is larger than {self.max_response} bytes"
            )
        if length != len(body) - 5:
            raise CallError(INTERNAL, "the daemon's answer is not exactly one message")
        return body[5:]


def unary(
    socket_path: str,
    method: str,
    request: bytes,
    timeout: float,
    *,
    max_response: int = DEFAULT_MAX_RESPONSE,
) -> bytes:
    """Call ``method`` (``/package.Service/Method``) at the gRPC server on the Unix socket
    ``socket_path`` with the serialized ``request``; the serialized response.

    The whole exchange takes at most ``timeout`` seconds. Raises :class:`CallError` on any
    failure, and nothing else (but for KeyboardInterrupt and the like).
    """
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.settimeout(max(timeout, 0.001))
            sock.connect(socket_path)
        except TimeoutError:
            raise CallError(DEADLINE_EXCEEDED, "deadline exceeded while connecting") from None
        except OSError as e:
            raise CallError(UNAVAILABLE, e.strerror or str(e), errno=e.errno) from None
        try:
            return _Call(sock, deadline, max_response).run(method, request, timeout)
        except TimeoutError:
            raise CallError(DEADLINE_EXCEEDED, "deadline exceeded") from None
        except h2.exceptions.H2Error as e:  # raised while sending: a state the peer forced
            raise CallError(INTERNAL, f"HTTP/2 error ({e})") from None
        except OSError as e:
            raise CallError(
                UNAVAILABLE, f"the connection to the daemon failed ({e.strerror or e})"
            ) from None
        except CallError:
            raise
        except Exception as e:  # anything else h2 or hpack may raise on hostile input
            raise CallError(INTERNAL, f"the exchange failed ({type(e).__name__}: {e})") from None
    finally:
        sock.close()
