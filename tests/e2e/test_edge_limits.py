"""The real server against hostile clients: header floods, slowloris, too many sockets, forged log lines."""

from __future__ import annotations

import resource
import socket
import time

import httpx
import pytest

from tests.e2e.conftest import Server, stop_server
from tests.edge_sockets import (connect, edge_registry, error_code, read_until_closed, rss_kib, send_in_background,
                                spawn, wait_ready)

TIMEOUTS = {"GPT4ALL_J_HEADER_TIMEOUT": "2", "GPT4ALL_J_BODY_TIMEOUT": "2", "GPT4ALL_J_KEEP_ALIVE_TIMEOUT": "1"}


def start(model_files, d, env=None, preexec_fn=None) -> Server:
    registry = edge_registry(model_files, d)
    proc, base = spawn(registry, d / "server.log", env=env, preexec_fn=preexec_fn)
    wait_ready(proc, base, d / "server.log")
    return Server(base, proc, d / "server.log")


@pytest.fixture(scope="module")
def edge(model_files, tmp_path_factory):
    srv = start(model_files, tmp_path_factory.mktemp("edge"), env=TIMEOUTS)
    yield srv
    stop_server(srv)


def port_of(srv: Server) -> int:
    return int(srv.base.rsplit(":", 1)[1])


def health_seconds(srv: Server) -> float:
    start = time.monotonic()
    assert httpx.get(srv.base + "/health", timeout=10).status_code == 200
    return time.monotonic() - start


def test_header_floods_get_431_at_once_and_memory_stays_flat(edge):
    before = rss_kib(edge.proc.pid)
    socks = [connect(port_of(edge)) for _ in range(8)]
    start = time.monotonic()
    lines = b"X-H: v\r\n" * 2_000_000  # 16 MB of headers on a request that never ends
    for sock in socks:
        send_in_background(sock, [b"GET /health HTTP/1.1\r\nHost: x\r\n", lines])
    answers = [read_until_closed(sock, 30) for sock in socks]
    assert time.monotonic() - start < 30
    for raw, closed in answers:
        assert closed and error_code(raw) == (431, "request_header_fields_too_large")
    assert rss_kib(edge.proc.pid) - before < 64 * 1024  # was +1.8 GiB
    assert health_seconds(edge) < 5
    for sock in socks:
        sock.close()


def test_one_huge_header_gets_431_without_being_read(edge):
    sock = connect(port_of(edge))
    chunk = b"a" * (1 << 20)
    send_in_background(sock, [b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ", *(chunk for _ in range(512))])
    start = time.monotonic()
    raw, closed = read_until_closed(sock, 30)
    assert closed and time.monotonic() - start < 20
    assert error_code(raw) == (431, "request_header_fields_too_large")
    assert health_seconds(edge) < 5
    sock.close()


def test_too_many_header_fields_get_431(edge):
    with connect(port_of(edge)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-H: v\r\n" * 150 + b"\r\n")
        raw, _ = read_until_closed(sock, 10)
    assert error_code(raw) == (431, "request_header_fields_too_large")
    r = httpx.get(edge.base + "/health", headers={f"x-h{i}": "v" for i in range(60)})
    assert r.status_code == 200


def test_slowloris_connections_are_closed_after_the_timeouts(edge):
    silent = connect(port_of(edge))
    half_headers = connect(port_of(edge))
    half_headers.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app")
    half_body = connect(port_of(edge))
    half_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"model\": ")
    start = time.monotonic()
    got = [read_until_closed(sock, 20) for sock in (silent, half_headers, half_body)]
    assert time.monotonic() - start < 20  # were open forever
    assert got[0] == (b"", True)
    assert got[1][1] and error_code(got[1][0]) == (408, "request_timeout")
    assert got[2][1] and error_code(got[2][0]) == (408, "request_timeout")
    assert health_seconds(edge) < 5
    for sock in (silent, half_headers, half_body):
        sock.close()


def test_more_idle_sockets_than_the_open_file_limit_do_not_stop_health(model_files, tmp_path):
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    srv = start(model_files, tmp_path, env={"GPT4ALL_J_HEADER_TIMEOUT": "60"}, preexec_fn=low_limit)
    socks: list[socket.socket] = []
    try:
        for _ in range(400):  # idle: connected, nothing sent (the header timeout is a minute)
            socks.append(connect(port_of(srv), timeout=5))
        assert health_seconds(srv) < 5  # the stalest idle sockets made room
        closed = sum(1 for sock in socks[:50] if read_until_closed(sock, 0.5) == (b"", True))
        assert closed == 50
        r = httpx.post(srv.url + "/completions", json={"model": "succ", "prompt": "a", "max_tokens": 2})
        assert r.status_code == 200
        assert "Traceback" not in srv.logs()
    finally:
        for sock in socks:
            sock.close()
        stop_server(srv)


def test_control_characters_cannot_forge_log_lines(edge):
    fake = "2026-01-01 00:00:00,000 INFO gpt4all_j_server.access: forged"
    with connect(port_of(edge)) as sock:
        sock.sendall(b"GET /x%0A" + fake.replace(" ", "%20").encode() + b"%1b[31m HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n\r\n")
        read_until_closed(sock, 10)
    httpx.post(edge.url + "/completions", json={"model": "no\nsuch\x1bmodel", "prompt": "a"})
    time.sleep(0.5)
    lines = edge.logs().splitlines()
    assert not [line for line in lines if line.startswith(fake) or "\x1b" in line or line.startswith("such")]
    # the access log writes the path as sent (percent-encoded): one line, no quote or space inside the field
    assert any('"GET /x%0A2026-01-01%2000:00:00,000%20INFO' in line and "%1b%5B31m" in line for line in lines)


def test_endless_chunked_trailers_get_431_at_once_and_memory_stays_flat(edge):
    # the body `{}` is complete; then a trailer field that never ends (was buffered without limit by the
    # parser until the body timeout: 68 -> 359 MiB with 4 connections, /health blocked 10 s)
    before = rss_kib(edge.proc.pid)
    socks = [connect(port_of(edge)) for _ in range(4)]
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-T: ")
    chunk = b"a" * 65536
    for sock in socks:
        send_in_background(sock, [head, *(chunk for _ in range(4096))])
    answers = [read_until_closed(sock, 30) for sock in socks]
    for raw, closed in answers:
        assert closed and error_code(raw) == (431, "request_header_fields_too_large")  # was 408
        assert b"trailer" in raw
    assert rss_kib(edge.proc.pid) - before < 64 * 1024
    assert health_seconds(edge) < 5
    for sock in socks:
        sock.close()
