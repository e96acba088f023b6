"""Netcap's parsers of what a command sent (the recording itself: tests/sandbox/test_netcap.py)."""

from __future__ import annotations

from airlock.sandbox import netcap


def test_parsers() -> None:
    assert netcap.parse_http(b"POST /a?b HTTP/1.0\r\nX: y\r\nhost:  h.example:8080\r\n\r\n") == (
        "POST",
        "h.example:8080",
        "/a?b",
    )
    assert netcap.parse_http(b"SSH-2.0-OpenSSH\r\n") == ("", "", "")
    assert netcap.parse_sni(b"\x16\x03\x01\x00") == ""
    assert netcap.parse_sni(b"GET / HTTP/1.1") == ""
