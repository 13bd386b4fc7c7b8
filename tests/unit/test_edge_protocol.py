"""The edge protocol (server.http_protocol) under uvicorn with a tiny ASGI app, driven by raw sockets."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import pytest
import uvicorn

from server.http_protocol import EdgeLimits, protocol_class
from tests.e2e.conftest import free_port
from tests.edge_sockets import (connect, error_code, parse_response, read_response, read_until_closed,
                                send_in_background)

LIMITS = EdgeLimits(max_header_bytes=4096, max_headers=20, header_timeout=1.0, body_timeout=1.0,
                    send_timeout=1.0, max_connections=8, max_body_bytes=16384)


class Events:
    """What the app saw, for the test thread."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.lock = threading.Lock()

    def add(self, item: str) -> None:
        with self.lock:
            self.items.append(item)

    def wait_for(self, item: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if item in self.items:
                    return True
            time.sleep(0.05)
        return False


def make_app(events: Events):
    async def app(scope, receive, send):
        if scope["path"] == "/big":
            await _big(int(scope["query_string"] or b"0"), receive, send, events)
            return
        if scope["path"] == "/stream":
            await _stream(int(scope["query_string"] or b"0"), send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                events.add("body:disconnect")
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        payload = f"ok {len(body)}".encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    return app


async def _big(size: int, receive, send, events: Events) -> None:
    """Stream `size` bytes in 16 KiB chunks; stop (and say so) when the client is gone."""
    gone = asyncio.Event()

    async def listen() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    listener = asyncio.ensure_future(listen())
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(size).encode())]})
    sent, chunk = 0, b"x" * 16384
    while sent < size and not gone.is_set():
        part = chunk[: size - sent]
        await send({"type": "http.response.body", "body": part, "more_body": sent + len(part) < size})
        sent += len(part)
    events.add("big:disconnected" if gone.is_set() else "big:done")
    listener.cancel()


async def _stream(ticks: int, send) -> None:
    """A chunked response of `ticks` lines 0.1 s apart, then `[DONE]`."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for _ in range(ticks):
        await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
        await asyncio.sleep(0.1)
    await send({"type": "http.response.body", "body": b"[DONE]\n"})


class ThreadServer:
    """uvicorn with the edge protocol on a free port, in a thread."""

    def __init__(self, limits: EdgeLimits, keep_alive: float = 5) -> None:
        self.events = Events()
        self.port = free_port()
        self.protocol = protocol_class(limits)
        config = uvicorn.Config(make_app(self.events), host="127.0.0.1", port=self.port, http=self.protocol,
                                ws="none", lifespan="off", log_config=None, loop="asyncio",
                                timeout_keep_alive=keep_alive)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def srv():
    server = ThreadServer(LIMITS)
    yield server
    server.stop()


def request(srv, raw: bytes, timeout: float = 10.0) -> bytes:
    with connect(srv.port) as sock:
        sock.sendall(raw)
        return read_until_closed(sock, timeout)[0]


def get(headers: bytes = b"", path: bytes = b"/") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + headers + b"\r\n"


def test_headers_within_the_caps_are_served(srv):
    assert parse_response(request(srv, get(b"X-H: v\r\n" * 17)))[0] == 200
    assert parse_response(request(srv, get(b"X-Big: " + b"a" * 3800 + b"\r\n")))[0] == 200


def test_headers_over_the_byte_cap_get_431_and_the_rest_is_not_read(srv):
    with connect(srv.port) as sock:
        start = time.monotonic()
        # a request that never ends: only the cap makes the server answer
        send_in_background(sock, [b"GET / HTTP/1.1\r\nHost: t\r\n", b"X-Big: " + b"a" * 8_000_000])
        raw, closed = read_until_closed(sock, 20)
    assert closed and time.monotonic() - start < 15
    assert error_code(raw) == (431, "request_header_fields_too_large")
    assert b"4096 bytes" in raw


def test_too_many_header_fields_get_431(srv):
    raw = request(srv, get(b"X-H: v\r\n" * 19))
    status, code = error_code(raw)
    assert (status, code) == (431, "request_header_fields_too_large") and b"20 header fields" in raw


def test_a_body_in_the_same_packet_as_headers_near_the_cap_is_not_counted_as_headers(srv):
    body = b"b" * 20000
    raw = request(srv, b"POST / HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Pad: " + b"p" * 3500
                  + b"\r\nContent-Length: 20000\r\n\r\n" + body)
    assert parse_response(raw)[:1] == (200,) and raw.endswith(b"ok 20000")


def test_pipelined_requests_are_each_answered(srv):
    one = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    with connect(srv.port) as sock:
        sock.sendall(one * 3 + get())
        raw, closed = read_until_closed(sock, 10)
    assert closed and raw.count(b"HTTP/1.1 200") == 4


def test_silent_and_slow_clients_are_closed_after_the_header_and_body_timeouts(srv):
    silent = connect(srv.port)
    half = connect(srv.port)
    half.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
    body = connect(srv.port)
    body.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
    trickle = connect(srv.port)
    slow_header = iter(lambda: time.sleep(0.2) or b"a", None)  # one byte every 0.2 s, forever
    send_in_background(trickle, itertools.chain([b"GET / HTTP/1.1\r\nHost: t\r\nX-A: "], slow_header))
    start = time.monotonic()
    results = {name: read_until_closed(sock, 15) for name, sock in
               [("silent", silent), ("half", half), ("body", body), ("trickle", trickle)]}
    assert time.monotonic() - start < 20
    assert results["silent"] == (b"", True)
    for name in ("half", "body", "trickle"):
        raw, closed = results[name]
        assert closed and error_code(raw) == (408, "request_timeout"), name
    assert srv.events.wait_for("body:disconnect", 5)  # the app waiting for the body was told
    for sock in (silent, half, body, trickle):
        sock.close()


def test_over_the_connection_cap_the_stalest_idle_connection_makes_room():
    server = ThreadServer(EdgeLimits(4096, 20, 30.0, 30.0, 1.0, max_connections=4))
    try:
        idle = [connect(server.port) for _ in range(4)]
        time.sleep(0.3)
        raw = request(server, get())
        assert parse_response(raw)[0] == 200
        assert read_until_closed(idle[0], 5) == (b"", True)  # the oldest idle one was closed
        busy = [connect(server.port) for _ in range(4)]  # evicts the 3 other idle ones, then fills the cap
        for sock in busy:  # headers in, body pending: a request in progress
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n")
        time.sleep(0.3)
        raw = request(server, get())
        assert error_code(raw) == (503, "too_many_connections")
        busy[0].sendall(b"0123456789")  # one request ends: its connection becomes idle, so evictable
        assert read_response(busy[0]).endswith(b"ok 10")
        assert parse_response(request(server, get()))[0] == 200
        assert read_until_closed(busy[0], 5) == (b"", True)
        for sock in [*idle, *busy]:
            sock.close()
    finally:
        server.stop()


def test_a_client_that_takes_no_data_is_cut_and_the_app_sees_it(srv):
    sock = connect(srv.port, rcvbuf=4096, mss=1400)
    sock.sendall(get(path=b"/big?8000000"))
    assert srv.events.wait_for("big:disconnected", 20)
    data, closed = read_until_closed(sock, 10)
    assert closed and len(data) < 8_000_000
    sock.close()


def test_a_slow_but_steady_reader_gets_everything(srv):
    size = 2_000_000
    sock = connect(srv.port, rcvbuf=16384, mss=1400)
    sock.sendall(get(path=b"/big?%d" % size))
    got = 0
    sock.settimeout(5)
    while True:  # about 400 KB/s: slower than the server writes, so its queue stays full
        chunk = sock.recv(8192)
        if not chunk:
            break
        got += len(chunk)
        time.sleep(0.02)
    assert size < got < size + 1000  # the whole body and the response head
    assert srv.events.wait_for("big:done", 5)
    sock.close()


CHUNKED = b"POST / HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_a_chunked_body_with_trailers_within_the_caps_is_served(srv):
    with connect(srv.port) as sock:
        sock.sendall(CHUNKED + b"64\r\n" + b"b" * 100 + b"\r\n")
        for _ in range(199):
            sock.sendall(b"64;ext=1\r\n" + b"b" * 100 + b"\r\n")
        for piece in (b"0\r\n", b"X-T: ", b"v" * 1000, b"\r\nX-U: w\r\n", b"\r\n"):
            sock.sendall(piece)  # the trailers, a piece at a time
            time.sleep(0.02)
        raw, closed = read_until_closed(sock, 10)
    assert closed and parse_response(raw)[0] == 200 and raw.endswith(b"ok 20000")


def test_endless_trailer_fields_get_431_at_once(srv):
    with connect(srv.port) as sock:
        # the body is complete; then a trailer field that never ends (was read until the body timeout, and
        # grown without limit by the parser)
        send_in_background(sock, itertools.chain([CHUNKED + b"2\r\n{}\r\n0\r\nX-T: "],
                                                 (b"a" * 8192 for _ in range(100_000))))
        raw, closed = read_until_closed(sock, 10)
    assert closed and error_code(raw) == (431, "request_header_fields_too_large")  # was 408 after 1 s
    assert b"trailer" in raw
    assert srv.events.wait_for("body:disconnect", 5)  # the app waiting for the body was told


def test_endless_chunk_framing_gets_413(srv):
    with connect(srv.port) as sock:
        # a chunk extension that never ends: no body byte, but bytes on the wire all the same
        send_in_background(sock, itertools.chain([CHUNKED + b"2\r\n{}\r\n5;ext="],
                                                 (b"e" * 8192 for _ in range(100_000))))
        raw, closed = read_until_closed(sock, 10)
    assert closed and error_code(raw) == (413, "request_too_large")  # was 408 after 1 s
    assert b"%d bytes" % LIMITS.max_body_bytes in raw


def test_an_idle_keep_alive_connection_outlasts_the_header_timeout():
    server = ThreadServer(EdgeLimits(4096, 20, header_timeout=1.0, body_timeout=1.0, send_timeout=1.0,
                                     max_connections=8), keep_alive=3.0)
    one = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    try:
        with connect(server.port) as sock:
            sock.sendall(one)
            assert parse_response(read_response(sock))[0] == 200
            time.sleep(2.0)  # idle: over the header timeout, within the keep-alive timeout
            sock.sendall(one)  # was closed after the header timeout (1 s)
            assert parse_response(read_response(sock))[0] == 200
            assert read_until_closed(sock, 10) == (b"", True)  # and closed by the keep-alive timeout
        with connect(server.port) as sock:
            sock.sendall(one)
            assert parse_response(read_response(sock))[0] == 200
            sock.sendall(b"GET / HTTP/1.1\r\nHost")  # a next request begun: the header timeout applies
            raw, closed = read_until_closed(sock, 10)
            assert closed and error_code(raw) == (408, "request_timeout")
    finally:
        server.stop()


def test_a_pipelined_request_waiting_for_its_turn_does_not_cut_the_stream_before_it(srv):
    with connect(srv.port) as sock:
        # a 2.5 s stream, then a request whose body is still coming while it waits (reading is paused):
        # its body timeout (1 s) starts when its turn comes
        sock.sendall(b"GET /stream?25 HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"POST / HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 10\r\n\r\n01234")
        time.sleep(0.3)
        sock.sendall(b"56789")
        raw, closed = read_until_closed(sock, 20)
    assert closed and b"[DONE]" in raw  # the stream was aborted after 1 s
    assert raw.count(b"HTTP/1.1 200") == 2 and raw.endswith(b"ok 10")
