"""Slow readers: a client that keeps reading gets the whole stream; one that reads nothing is cut."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.e2e.conftest import Server, stop_server
from tests.edge_sockets import connect, edge_registry, read_response, read_until_closed, spawn, wait_ready
from tests.models import NO_EOS

SEND_TIMEOUT = 2
BODY_TIMEOUT = 1
HEADER_TIMEOUT = 2
KEEP_ALIVE_TIMEOUT = 6


@pytest.fixture(scope="module")
def srv(model_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("edge-streams")
    proc, base = spawn(edge_registry(model_files, d, slow=True), d / "server.log",
                       env={"GPT4ALL_J_SEND_TIMEOUT": str(SEND_TIMEOUT), "GPT4ALL_J_BODY_TIMEOUT": str(BODY_TIMEOUT),
                            "GPT4ALL_J_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
                            "GPT4ALL_J_KEEP_ALIVE_TIMEOUT": str(KEEP_ALIVE_TIMEOUT)})
    wait_ready(proc, base, d / "server.log")
    server = Server(base, proc, d / "server.log")
    yield server
    stop_server(server)


def stream_request(body: dict) -> bytes:
    payload = json.dumps({**body, "stream": True}).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(payload)) + payload


def dechunk(raw: bytes) -> bytes:
    """The body of a chunked HTTP response."""
    body = raw.partition(b"\r\n\r\n")[2]
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2:]
    return out


def texts(events: list[str]) -> dict[int, str]:
    """Each choice's whole text from SSE payloads."""
    out: dict[int, str] = {}
    for payload in events:
        if payload != "[DONE]":
            for choice in json.loads(payload)["choices"]:
                out[choice["index"]] = out.get(choice["index"], "") + choice["text"]
    return out


def sse_payloads(body: bytes) -> list[str]:
    return [line[6:] for line in body.decode().split("\r\n") if line.startswith("data: ")]


def port_of(srv: Server) -> int:
    return int(srv.base.rsplit(":", 1)[1])


def test_a_slow_reader_gets_every_chunk_and_done(srv):
    # ~300 KB of events (24 choices x 60 tokens): ~30 s at the reader's pace, far slower than produced
    body = {"model": "rand", "prompt": ["a", "b", "c"], "n": 8, "max_tokens": 60, "temperature": 0, **NO_EOS}
    with httpx.Client(timeout=60) as client, client.stream("POST", srv.url + "/completions",
                                                           json={**body, "stream": True}) as r:
        expected = texts([line[6:] for line in r.iter_lines() if line.startswith("data: ")])
    sock = connect(port_of(srv), rcvbuf=2048, mss=536)
    sock.sendall(stream_request(body))
    raw, start = b"", time.monotonic()
    while time.monotonic() - start < 240:  # about 10 KB/s through a small window (a bound only against a hang)
        chunk = sock.recv(512)
        if not chunk:
            break
        raw += chunk
        time.sleep(0.05)
    sock.close()
    payloads = sse_payloads(dechunk(raw))
    assert payloads[-1] == "[DONE]"
    assert texts(payloads) == expected
    assert time.monotonic() - start > 2 * SEND_TIMEOUT  # it really was slow: longer than the send timeout


def test_a_client_that_reads_nothing_is_cut_and_the_worker_is_free(srv):
    # about 1.2 MB of events: more than the kernel's buffers take for a client that reads nothing
    body = {"model": "rand", "prompt": ["a", "b", "c", "d"], "n": 8, "max_tokens": 120, "logprobs": 5, **NO_EOS}
    sock = connect(port_of(srv), rcvbuf=4096, mss=1400)
    sock.sendall(stream_request(body))
    time.sleep(0.5)
    start = time.monotonic()
    r = httpx.post(srv.url + "/completions", json={"model": "rand", "prompt": "x", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and time.monotonic() - start < 30  # the model's one worker is free
    time.sleep(SEND_TIMEOUT + 4)  # now the server has cut the connection
    raw, closed = read_until_closed(sock, 20)
    sock.close()
    assert closed and b"data: [DONE]" not in raw
    assert "took no data for 2s" in srv.logs()


def test_a_pipelined_request_waiting_for_its_turn_does_not_cut_the_stream_before_it(srv):
    # a stream of a few seconds (longer than the body timeout), then a request that sends its body only
    # when told to (Expect: 100-continue), which is when its turn comes: its body timeout runs from then
    first = stream_request({"model": "slow", "prompt": "Once", "max_tokens": 800, **NO_EOS})
    second = json.dumps({"model": "succ", "prompt": "a", "max_tokens": 2}).encode()
    sock = connect(port_of(srv))
    start = time.monotonic()
    sock.sendall(first.replace(b"Connection: close\r\n", b"") + b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nConnection: close\r\nExpect: 100-continue\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(second))
    raw = b""
    while b"HTTP/1.1 100 Continue\r\n\r\n" not in raw and time.monotonic() - start < 60:
        chunk = sock.recv(65536)
        if not chunk:
            break
        raw += chunk
    sock.sendall(second)
    rest, closed = read_until_closed(sock, 60)
    sock.close()
    stream, _, answer = (raw + rest).partition(b"0\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 ")
    assert closed and sse_payloads(dechunk(stream))[-1] == "[DONE]"  # was cut after the body timeout
    assert time.monotonic() - start > BODY_TIMEOUT  # the stream did outlast it
    assert answer.startswith(b"200 ") and b'"text"' in answer


def test_an_idle_keep_alive_connection_outlasts_the_header_timeout(srv):
    one = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(port_of(srv)) as sock:
        sock.sendall(one)
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(HEADER_TIMEOUT + 1)  # within the keep-alive timeout (was closed after the header timeout)
        sock.sendall(one)
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        assert read_until_closed(sock, KEEP_ALIVE_TIMEOUT + 10) == (b"", True)  # closed once idle too long
