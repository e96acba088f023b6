"""The recorder's stand-ins for host Unix sockets (``NetworkRecorder.add_host_socket``), with
real sockets: what a client connecting to one sends is recorded, it is closed, and the
attempts are bounded."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from airlock.egress import HOST_SERVICE
from airlock.sandbox import netcap
from airlock.sandbox.netcap import NetProtocol

REQUEST = b"POST /containers/web/stop HTTP/1.1\r\nHost: docker\r\n\r\n"


def _recorder(tmp_path: Path, limits: netcap.NetcapLimits) -> tuple[netcap.NetworkRecorder, str]:
    recorder = netcap.NetworkRecorder(limits)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stand_in = str(tmp_path / "stand-in.sock")
    listener.bind(stand_in)
    listener.listen(8)
    recorder.add_host_socket(listener, "/run/docker.sock")
    return recorder, stand_in


def _until(recorder: netcap.NetworkRecorder, done: int) -> None:
    deadline = time.monotonic() + 5
    while len(recorder.take_done()) < done and time.monotonic() < deadline:
        recorder.handle()
        time.sleep(0.005)


def test_a_connection_is_recorded_with_the_path_and_request_then_closed(tmp_path: Path) -> None:
    recorder, stand_in = _recorder(tmp_path, netcap.NetcapLimits())
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(stand_in)
            client.sendall(REQUEST)
            _until(recorder, 1)
            client.settimeout(2)
            try:
                answer = client.recv(10)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # closed, no answer
        (a,) = recorder.attempts()
        assert (a.protocol, a.address, a.port, a.refusal) == (
            NetProtocol.UNIX,
            "/run/docker.sock",
            0,
            HOST_SERVICE,
        )
        assert (a.http_method, a.http_host, a.http_path) == (
            "POST",
            "docker",
            "/containers/web/stop",
        )
        assert a.payload_prefix == REQUEST and a.bytes_sent == len(REQUEST)
    finally:
        recorder.close()


def test_attempts_are_bounded(tmp_path: Path) -> None:
    recorder, stand_in = _recorder(tmp_path, netcap.NetcapLimits(max_attempts=1, payload_bytes=8))
    try:
        clients = []
        for _ in range(3):
            c = socket.socket(socket.AF_UNIX)
            c.connect(stand_in)
            c.sendall(REQUEST)
            clients.append(c)
        deadline = time.monotonic() + 5
        while recorder.dropped < 2 and time.monotonic() < deadline:
            recorder.handle()
            time.sleep(0.005)
        _until(recorder, 1)
        (a,) = recorder.attempts()
        assert recorder.dropped == 2
        assert a.payload_prefix == REQUEST[:8] and a.http_method == ""
        for c in clients:
            c.close()
    finally:
        recorder.close()
