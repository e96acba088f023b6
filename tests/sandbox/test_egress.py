"""Egress in a dry run, on the kernel, without a daemon: the network recorder forwards what a
grant allows (fetch-only) to an HTTPS and an HTTP server in a lab namespace the test creates,
and refuses the rest at once.

Each test runs a script as nobody in a fresh network namespace with the recorder installed and
configured, as the supervisor does (sandbox/contain.py); the "sensitive read" is a marker file
the script creates (the daemon tests use the real read recorder).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from airlock.egress import EgressPolicy, EgressRule
from airlock.sandbox.netcap import NetcapLimits
from airlock.types import NetProtocol
from tests.helpers import public_dir
from tests.helpers.egress import Lab, egress_lab, run_sandboxed
from tests.helpers.host import loopback_listener


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with public_dir() as d, egress_lab(d) as lab:
        yield lab


def _policy(lab: Lab, *hosts: str, cidr: bool = True) -> EgressPolicy:
    return EgressPolicy(
        allow=(
            EgressRule(
                hosts=hosts or ("pkg.test", "other.test"),
                ports=((80, 80), (443, 443)),
                cidrs=(lab.cidr,) if cidr else (),
                label="lab",
            ),
        )
    )


def _resolve(lab: Lab, **extra: str) -> dict[str, tuple[str, ...]]:
    found: dict[str, tuple[str, ...]] = {n: (lab.address,) for n in lab.names}
    found.update({k.replace("_", "."): (v,) for k, v in extra.items()})
    return found


# The client side: a small library the scripts start with.
CLIENT = r"""
import json, socket, ssl, time
CA = {ca!r}
def out(**kw):
    print(json.dumps(kw), flush=True)
def https_get(host, path, sni=None, port=443):
    ctx = ssl.create_default_context(cafile=CA)
    with socket.create_connection((host, port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname=sni or host) as t:
            head = f"GET {{path}} HTTP/1.1\r\nHost: {{host}}\r\nConnection: close\r\n\r\n"
            t.sendall(head.encode())
            data = b""
            while chunk := t.recv(65536):
                data += chunk
    return data
def raw(host, port, request):
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data
def error(fn, *args, **kw):
    t0 = time.perf_counter()
    try:
        fn(*args, **kw)
        return "no error", time.perf_counter() - t0
    except Exception as e:
        return type(e).__name__ + ": " + str(e), time.perf_counter() - t0
"""


def _script(lab: Lab, body: str) -> str:
    return CLIENT.format(ca=str(lab.ca)) + body


def test_an_allowed_fetch_works_and_is_recorded(lab: Lab) -> None:
    body = r"""
data = https_get("pkg.test", "/bytes/300000")
out(https=len(data), status=data.split(b"\r\n", 1)[0].decode())
data = raw("pkg.test", 80,
    b"GET /bytes/5000 HTTP/1.1\r\nHost: pkg.test\r\nConnection: close\r\n\r\n")
out(http=len(data))
"""
    before = len(lab.requests())
    o = run_sandboxed(_script(lab, body), _policy(lab), _resolve(lab))
    r = o.results()
    assert o.status == 0, o.output
    assert r["status"] == "HTTP/1.1 200 OK" and int(str(r["https"])) > 300000
    assert int(str(r["http"])) > 5000
    https, http = o.tcp()
    for a, port in ((https, 443), (http, 80)):
        assert (a.dns_name, a.port, a.forwarded, a.grant, a.refusal) == (
            "pkg.test",
            port,
            True,
            "lab",
            "",
        ), a
        assert a.upstream_address == lab.address
    assert https.sni == "pkg.test" and https.bytes_received > 300000
    assert (http.http_method, http.http_host, http.http_path) == ("GET", "pkg.test", "/bytes/5000")
    assert http.bytes_received > 5000 and http.bytes_sent == len(http.payload_prefix)
    dns = [a for a in o.attempts if a.protocol is NetProtocol.DNS and a.dns_type == "A"]
    assert {(a.dns_name, a.grant, a.refusal) for a in dns} == {("pkg.test", "lab", "")}
    got = lab.requests()[before:]
    assert [(g["method"], g["path"], g["host"], g["tls"]) for g in got] == [
        ("GET", "/bytes/300000", "pkg.test", True),
        ("GET", "/bytes/5000", "pkg.test", False),
    ]


def test_a_blocked_host_fails_at_once_and_is_recorded(lab: Lab) -> None:
    # connect() succeeds (the recorder's transparent socket accepts); the first read after
    # the client's first message gets a reset. A client that waits for the server to speak
    # first is reset after NetcapLimits.refuse_wait_s (50 ms).
    body = r"""
def client_first():
    with socket.create_connection(("blocked.test", 443), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n")
        s.recv(100)
        raise SystemExit("no error")
def server_first():
    with socket.create_connection(("blocked.test", 22), timeout=10) as s:
        if not s.recv(100):
            raise ConnectionError("closed without a reset")
socket.gethostbyname("blocked.test")  # not timed: the placeholder answer
times = {}
for name, fn in (("client_first", client_first), ("server_first", server_first)):
    runs = [error(fn) for _ in range(20)]
    times[name] = sorted(t for _, t in runs)
    out(**{name + "_error": runs[0][0]})
out(times=times)
try:
    https_get("blocked.test", "/")
except Exception as e:
    out(tls_error=type(e).__name__)
"""
    before = len(lab.requests())
    o = run_sandboxed(_script(lab, body), _policy(lab), _resolve(lab, blocked_test=lab.address))
    r = o.results()
    assert o.status == 0, o.output
    assert str(r["client_first_error"]).startswith("ConnectionResetError"), r
    assert str(r["server_first_error"]).startswith("ConnectionResetError"), r
    assert r["tls_error"] in ("ConnectionResetError", "SSLEOFError"), r
    times = r["times"]
    assert isinstance(times, dict)
    client_first, server_first = times["client_first"], times["server_first"]
    print(
        "connect->error, 20 runs each: client speaks first p50 "
        f"{client_first[10] * 1000:.2f} ms max {client_first[-1] * 1000:.2f} ms; server speaks "
        f"first p50 {server_first[10] * 1000:.2f} ms max {server_first[-1] * 1000:.2f} ms"
    )
    assert client_first[10] < 0.1 and server_first[10] < 0.1
    tcp = o.tcp()
    assert len(tcp) == 41
    assert {(a.dns_name, a.forwarded, a.refusal) for a in tcp} == {
        ("blocked.test", False, "no-grant")
    }
    first = tcp[0]
    assert (first.http_method, first.http_host) == ("GET", "blocked.test")
    assert tcp[-1].sni == "blocked.test"  # a refused TLS attempt keeps its ClientHello
    assert lab.requests()[before:] == []


def test_fetch_only_cuts_a_post_and_a_large_tls_upload(lab: Lab) -> None:
    body = r"""
out(post=error(raw, "pkg.test", 80,
    b"POST /upload HTTP/1.1\r\nHost: pkg.test\r\nContent-Length: 11\r\n\r\nsecret=1234")[0])
out(get_then_put=error(raw, "pkg.test", 80,
    b"GET /bytes/10 HTTP/1.1\r\nHost: pkg.test\r\n\r\n"
    b"PUT /x HTTP/1.1\r\nHost: pkg.test\r\nContent-Length: 3\r\n\r\nabc")[0])
out(get_with_body=error(raw, "pkg.test", 80,
    b"GET / HTTP/1.1\r\nHost: pkg.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n")[0])
def upload():
    ctx = ssl.create_default_context(cafile=CA)
    with socket.create_connection(("pkg.test", 443), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="pkg.test") as t:
            size = 1 << 20
            head = f"POST /upload HTTP/1.1\r\nHost: pkg.test\r\nContent-Length: {size}\r\n\r\n"
            t.sendall(head.encode())
            sent = 0
            try:
                while sent < size:
                    t.sendall(b"y" * 16384)
                    sent += 16384
                t.recv(100)
            finally:
                out(tls_sent=sent)
out(tls_upload=error(upload)[0])
"""
    before = len(lab.requests())
    o = run_sandboxed(_script(lab, body), _policy(lab), _resolve(lab))
    r = o.results()
    assert o.status == 0, o.output
    # The TLS client may see the reset as a reset, a broken pipe or an unclean EOF.
    for key in ("post", "get_with_body"):
        assert str(r[key]).startswith(("ConnectionResetError", "BrokenPipeError", "SSLEOF")), (
            key,
            r,
        )
    post, get_put, get_body, tls = o.tcp()
    assert (post.refusal, post.forwarded, post.http_method) == ("not-fetch", False, "POST")
    assert "POST is not a fetch" in post.refusal_detail
    assert (get_put.refusal, get_body.refusal) == ("not-fetch", "not-fetch")
    assert "with a body" in get_body.refusal_detail
    assert (tls.refusal, tls.forwarded, tls.grant) == ("upload-cap", True, "lab")
    assert tls.bytes_sent > 65536 > tls.bytes_sent - 20 * 16384
    assert r["tls_sent"] == 1 << 20 or not str(r["tls_upload"]).startswith("no error")
    got = lab.requests()[before:]
    # No POST or PUT was forwarded over plain HTTP (the GET before the PUT was not either: the
    # connection was cut as soon as the PUT was seen), and the TLS upload was cut before
    # 64 KiB of it had been forwarded.
    uploads = [g for g in got if g["method"] != "GET"]
    assert all(g["tls"] and int(str(g["body"])) < 65536 for g in uploads), got


def test_nothing_is_forwarded_after_a_sensitive_read(lab: Lab) -> None:
    marker = str(lab.root.parent / "read-a-secret")
    lab.root.parent.chmod(0o777)
    body = rf"""
out(before=len(https_get("pkg.test", "/bytes/100")))
s = socket.create_connection(("pkg.test", 80), timeout=10)  # opened before the read
open({marker!r}, "w").close()  # the "sensitive read"
s.sendall(b"GET /bytes/10?key=stolen HTTP/1.1\r\nHost: pkg.test\r\n\r\n")
out(open_connection=error(s.recv, 100)[0])
out(after=error(https_get, "pkg.test", "/bytes/100")[0])
"""
    before = len(lab.requests())
    o = run_sandboxed(_script(lab, body), _policy(lab), _resolve(lab), marker=marker)
    r = o.results()
    assert o.status == 0, o.output
    assert int(str(r["before"])) > 100
    assert str(r["open_connection"]).startswith("ConnectionResetError"), r
    assert not str(r["after"]).startswith("no error"), r
    first, during, after = o.tcp()
    assert (first.forwarded, first.refusal) == (True, "")
    assert (during.refusal, during.grant) == ("sensitive-read", "lab")
    assert during.payload_prefix.startswith(b"GET /bytes/10?key=stolen")
    assert (after.refusal, after.forwarded) == ("sensitive-read", False)
    assert [g["path"] for g in lab.requests()[before:]] == ["/bytes/100"]


@pytest.fixture
def host_listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP listener on the host's 127.0.0.1 that records whatever reaches it."""
    with loopback_listener() as listener:
        yield listener


def test_granted_names_that_resolve_to_special_addresses_are_refused(
    lab: Lab, host_listener: tuple[int, list[bytes]]
) -> None:
    port, got = host_listener
    body = rf"""
for host in ("loop.test", "meta.test", "host.test", "mapped.test"):
    request = b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n"
    out(**{{host: error(raw, host, {port}, request)[0]}})
"""
    egress = EgressPolicy(
        allow=(
            EgressRule(
                hosts=("loop.test", "meta.test", "host.test", "mapped.test"),
                ports=((port, port),),
                label="too-wide",
            ),
        )
    )
    resolve = _resolve(
        lab,
        loop_test="127.0.0.1",
        meta_test="169.254.169.254",
        host_test=lab.host_address,
        mapped_test="::ffff:127.0.0.1",
    )
    o = run_sandboxed(_script(lab, body), egress, resolve)
    r = o.results()
    assert o.status == 0, o.output
    tcp = o.tcp()
    assert [(a.dns_name, a.refusal, a.forwarded) for a in tcp] == [
        (h, "address", False) for h in ("loop.test", "meta.test", "host.test", "mapped.test")
    ]
    assert "loopback" in tcp[0].refusal_detail and "metadata" in tcp[1].refusal_detail
    assert "private" in tcp[2].refusal_detail  # the host's own veth address (unit-tested: public)
    assert all(str(v).startswith("ConnectionResetError") for v in r.values()), r
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"probe")
    for _ in range(50):
        if got:
            break
        time.sleep(0.05)
    assert got == [b"probe"]  # the listener works, and saw nothing from the sandbox


def test_tls_server_name_and_http_host_must_be_the_name_looked_up(lab: Lab) -> None:
    # other.test is granted too, and served by the same address: a request for it sent to
    # pkg.test's placeholder is domain fronting, refused.
    body = r"""
out(sni=error(https_get, "pkg.test", "/", sni="other.test")[0])
out(host=error(raw, "pkg.test", 80, b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n")[0])
out(absolute=error(raw, "pkg.test", 80,
    b"GET http://other.test/ HTTP/1.1\r\nHost: pkg.test\r\n\r\n")[0])
out(two_hosts=error(raw, "pkg.test", 80,
    b"GET / HTTP/1.1\r\nHost: pkg.test\r\nHost: other.test\r\n\r\n")[0])
out(not_http=error(raw, "pkg.test", 80, b"\x00\x01binary protocol\r\n")[0])
"""
    before = len(lab.requests())
    o = run_sandboxed(_script(lab, body), _policy(lab), _resolve(lab))
    assert o.status == 0, o.output
    assert [(a.refusal, a.forwarded) for a in o.tcp()] == [
        ("name-mismatch", False),
        ("name-mismatch", False),
        ("not-fetch", False),
        ("name-mismatch", False),
        ("not-fetch", False),
    ]
    assert "TLS server name other.test is not pkg.test" in o.tcp()[0].refusal_detail
    assert lab.requests()[before:] == []


def test_granted_names_are_resolved_by_the_recorder_itself(lab: Lab) -> None:
    # No test overrides: the upstream side asks a resolver (the lab's, standing in for the
    # host's /etc/resolv.conf) for the real address of the name the sandbox looked up.
    body = r"""
out(fetched=len(https_get("pkg.test", "/bytes/1000")))
out(gone=error(https_get, "gone.test", "/")[0])
"""
    egress = _policy(lab, "pkg.test", "gone.test")
    o = run_sandboxed(_script(lab, body), egress, {}, resolvers=[lab.address])
    assert o.status == 0, o.output
    assert int(str(o.results()["fetched"])) > 1000
    ok, gone = o.tcp()
    assert (ok.forwarded, ok.upstream_address) == (True, lab.address)
    assert (gone.refusal, gone.forwarded) == ("resolve", False)
    assert "gone.test does not exist (NXDOMAIN)" in gone.refusal_detail


def test_names_looked_up_are_not_resolved_upstream_and_resolved_ones_are_capped(lab: Lab) -> None:
    # The reviewer's attack: data in the labels of names below a wildcard grant, only looked
    # up (getaddrinfo, no connection). None of them may reach a resolver. A connection to
    # such a name does resolve it, at most NetcapLimits.upstream_names distinct names a run.
    body = r"""
import base64
chunk = base64.b32encode(b"s" * 35).decode().rstrip("=").lower()
for i in range(400):
    try:
        socket.gethostbyname(f"{chunk}.{i}.archive.ubuntu.test")
    except OSError:
        pass
for i in range(80):
    name = f"c{i}.{chunk}.archive.ubuntu.test"
    error(raw, name, 80, b"GET / HTTP/1.1\r\nHost: " + name.encode() + b"\r\n\r\n")
out(done=True)
"""
    egress = EgressPolicy(
        allow=(EgressRule(hosts=("*.archive.ubuntu.test",), ports=((80, 80),), label="wild"),)
    )
    before = len(lab.dns_queries())
    o = run_sandboxed(_script(lab, body), egress, {}, resolvers=[lab.address])
    assert o.status == 0, o.output
    asked = set(lab.dns_queries()[before:])
    assert all(q.startswith("c") for q in asked), sorted(asked)[:5]  # no lookup-only name
    assert len(asked) == NetcapLimits().upstream_names == 64
    lookups = [a for a in o.attempts if a.protocol is NetProtocol.DNS and a.dns_type == "A"]
    assert len(lookups) >= 480 and {a.grant for a in lookups} == {"wild"}  # recorded as before
    tcp = o.tcp()
    assert [a.refusal for a in tcp] == ["resolve"] * 64 + ["limit"] * 16
    assert "more than 64 names resolved in one run" in tcp[-1].refusal_detail


def _count_all(conn: socket.socket) -> int:
    """Every byte a connection sends, until it closes (or stalls for 5 s)."""
    n = 0
    with contextlib.suppress(OSError):
        conn.settimeout(5)
        while chunk := conn.recv(65536):
            n += len(chunk)
    return n


def test_client_hellos_count_against_the_caps(lab: Lab) -> None:
    # The reviewer's attack: many connections, each with a padded 16 KB ClientHello (then
    # ones of 8000 bytes, just under NetcapLimits.tls_hello_bytes). What reaches the
    # destination stays within the per-run cap, and the run forwards at most
    # NetcapLimits.forwarded_connections connections.
    with loopback_listener(_count_all) as (port, got):
        body = rf"""
import struct
def hello(size):
    sni = b"hello.test"
    ext_sni = struct.pack("!HHHBH", 0, len(sni) + 5, len(sni) + 3, 0, len(sni)) + sni
    body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    pad = size - 5 - 4 - len(body) - 2 - len(ext_sni) - 4
    exts = ext_sni + struct.pack("!HH", 21, pad) + b"\x00" * pad
    hs = body + struct.pack("!H", len(exts)) + exts
    msg = b"\x01" + struct.pack("!I", len(hs))[1:] + hs
    return b"\x16\x03\x01" + struct.pack("!H", len(msg)) + msg
address = socket.gethostbyname("hello.test")
def send(size):
    with socket.create_connection((address, {port}), timeout=10) as s:
        s.sendall(hello(size))
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
for size in [16000] * 100 + [8000] * 140 + [300] * 20:
    error(send, size)
out(done=True)
"""
        egress = EgressPolicy(
            allow=(
                EgressRule(
                    hosts=("hello.test",),
                    ports=((port, port),),
                    cidrs=("127.0.0.1/32",),
                    label="hello",
                ),
            )
        )
        o = run_sandboxed(_script(lab, body), egress, {"hello.test": ("127.0.0.1",)})
        for _ in range(40):  # the listener finishes its last connection
            seen = (len(got), sum(got))
            time.sleep(0.05)
            if (len(got), sum(got)) == seen:
                break
    assert o.status == 0, o.output
    tcp = o.tcp()
    assert len(tcp) == 260 and {a.sni for a in tcp} == {"hello.test"}
    assert {(a.refusal, a.forwarded) for a in tcp[:100]} == {("upload-cap", False)}
    assert "a TLS ClientHello of 16000 bytes (at most 8192)" in tcp[0].refusal_detail
    total = sum(got)
    print(f"{len(got)} connections reached the destination with {total} bytes")
    assert 128 * 8000 <= total <= NetcapLimits().upload_bytes_per_run
    assert [a.refusal for a in tcp[-4:]] == ["limit"] * 4
    assert "more than 256 connections in one run" in tcp[-1].refusal_detail
    assert [a.refusal for a in tcp[:256]].count("limit") == 0
