"""The egress relay's pure parts: the fetch-only check of an HTTP request stream
(netcap.HttpFetch) and the upstream side's DNS answers (upstream.parse_dns_answer)."""

from __future__ import annotations

import socket
import struct

import pytest

from airlock.sandbox.netcap import HttpFetch
from airlock.sandbox.upstream import _query, parse_dns_answer

GET = b"GET /simple/requests/ HTTP/1.1\r\nHost: pypi.org\r\nAccept: */*\r\n\r\n"


def test_gets_and_heads_to_the_name_pass_one_by_one_even_split() -> None:
    f = HttpFetch("pypi.org", 16384)
    head = b"HEAD /x HTTP/1.1\r\nhost: PyPI.org.:443\r\nContent-Length: 0\r\n\r\n"
    stream = GET + head + GET[:10]
    assert f.feed(stream[:7]) == (b"", "", "")  # nothing before a whole head
    assert f.feed(stream[7:]) == (GET + head, "", "")
    assert f.feed(GET[10:]) == (GET, "", "")
    assert f.requests == 3
    assert HttpFetch("", 16384).feed(b"GET / HTTP/1.0\r\n\r\n") == (
        b"GET / HTTP/1.0\r\n\r\n",
        "",
        "",
    )  # no name to check (a CIDR grant): no Host needed


@pytest.mark.parametrize(
    ("request_bytes", "refusal", "words"),
    [
        (
            b"POST /x HTTP/1.1\r\nHost: pypi.org\r\nContent-Length: 3\r\n\r\nabc",
            "not-fetch",
            "POST",
        ),
        (b"PUT /x HTTP/1.1\r\nHost: pypi.org\r\n\r\n", "not-fetch", "PUT is not a fetch"),
        (b"GET / HTTP/1.1\r\nHost: pypi.org\r\nContent-Length: 5\r\n\r\n", "not-fetch", "body"),
        (
            b"GET / HTTP/1.1\r\nHost: pypi.org\r\nTransfer-Encoding: chunked\r\n\r\n",
            "not-fetch",
            "body",
        ),
        (b"GET / HTTP/1.1\r\nHost: pypi.org\r\nUpgrade: websocket\r\n\r\n", "not-fetch", "upgrade"),
        (b"GET http://evil.example/ HTTP/1.1\r\nHost: pypi.org\r\n\r\n", "not-fetch", "not a path"),
        (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: pypi.org\r\n\r\n", "not-fetch", "CONNECT"),
        (b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n", "name-mismatch", "evil.example"),
        (
            b"GET / HTTP/1.1\r\nHost: pypi.org\r\nHost: evil.example\r\n\r\n",
            "name-mismatch",
            "more",
        ),
        (b"GET / HTTP/1.0\r\n\r\n", "name-mismatch", "without Host"),
        (
            b"GET / HTTP/1.1\r\nHost: pypi.org\nTransfer-Encoding: chunked\r\n\r\n",
            "not-fetch",
            "bare",
        ),
        (b"GET / HTTP/1.1\r\n Host: pypi.org\r\n\r\n", "not-fetch", "malformed"),
        (b"GET / HTTP/2.0\r\nHost: pypi.org\r\n\r\n", "not-fetch", "not an HTTP/1"),
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n", "not-fetch", "too large"),
    ],
)
def test_anything_but_a_plain_fetch_to_the_name_is_refused(
    request_bytes: bytes, refusal: str, words: str
) -> None:
    f = HttpFetch("pypi.org", 16384)
    ok, got, detail = f.feed(GET + request_bytes)
    assert ok == GET  # what came before it passed
    assert (got, words in detail) == (refusal, True), detail


def dns_response(ident: int, name: str, answers: list[tuple[int, bytes]], rcode: int = 0) -> bytes:
    q = _query(ident, name, 1)
    header = struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, len(answers), 0, 0)
    body = q[12:]
    for rtype, data in answers:
        body += struct.pack("!HHHIH", 0xC00C, rtype, 1, 60, len(data)) + data
    return header + body


def test_dns_answers_give_their_a_and_aaaa_records() -> None:
    msg = dns_response(
        0x1234,
        "pypi.org",
        [
            (5, b"\x03www\x00"),  # a CNAME: skipped
            (1, socket.inet_aton("151.101.0.223")),
            (28, socket.inet_pton(socket.AF_INET6, "2a04:4e42::223")),
        ],
    )
    assert parse_dns_answer(msg) == (
        0x1234,
        0,
        [(socket.AF_INET, "151.101.0.223"), (socket.AF_INET6, "2a04:4e42::223")],
    )
    assert parse_dns_answer(dns_response(7, "nope.example", [], rcode=3)) == (7, 3, [])
    assert _query(1, "pypi.org", 28)[12:] == b"\x04pypi\x03org\x00\x00\x1c\x00\x01"


# --- Execute: not fetch-only, but still the granted name -------------------------------------


def test_execute_lets_any_method_and_body_through_after_the_first_head_names_the_grant() -> None:
    check = HttpFetch("pkg.test", 16 * 1024, fetch_only=False)
    body = b"x" * 100_000
    head = b"POST /upload HTTP/1.1\r\nHost: pkg.test\r\nContent-Length: 100000\r\n\r\n"
    out, refusal, _ = check.feed(head + body[:10])
    assert (out, refusal) == (head + body[:10], "")
    # From then on the stream passes as it is (bodies, later requests).
    assert check.feed(body[10:]) == (body[10:], "", "")


@pytest.mark.parametrize(
    ("head", "refusal"),
    [
        (b"POST / HTTP/1.1\r\nHost: other.test\r\n\r\n", "name-mismatch"),
        (b"PUT / HTTP/1.1\r\n\r\n", "name-mismatch"),
        (b"GET http://other.test/ HTTP/1.1\r\nHost: pkg.test\r\n\r\n", "not-fetch"),
        (b"GET / HTTP/1.1\r\nHost: pkg.test\r\nHost: other.test\r\n\r\n", "name-mismatch"),
    ],
)
def test_execute_still_refuses_a_first_request_for_another_name(head: bytes, refusal: str) -> None:
    out, got, _ = HttpFetch("pkg.test", 16 * 1024, fetch_only=False).feed(head)
    assert (out, got) == (b"", refusal)
