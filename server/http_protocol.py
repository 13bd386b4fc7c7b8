"""uvicorn's httptools protocol with the limits a server on an open network needs.

- Request line + headers: at most `max_header_bytes` bytes and `max_headers` fields, else 431 (nothing
  beyond the cap is buffered or parsed).
- Time: complete headers within `header_timeout` of connecting or of the previous response (else the
  connection is closed, with a 408 if part of a request came); the whole body within `body_timeout` of
  the headers (else 408); idle keep-alive connections are closed by uvicorn (`timeout_keep_alive`).
- Connections: at most `max_connections`; a newcomer over the cap closes the least recently active
  connection with no request in progress, or gets 503 when every connection is busy.
- Slow readers: a response's output is queued (up to WRITE_HIGH_WATER bytes) rather than blocking the
  app, and a client that takes no data for `send_timeout` while output waits is disconnected (the app
  sees http.disconnect). Progress is what the client's TCP stack acknowledges, so a client that reads
  slowly but steadily is never cut, while one that reads nothing cannot be sent a final event.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from server.errors import error_body

log = logging.getLogger("gpt4all_j_server.http")

WRITE_HIGH_WATER = 1024 * 1024  # output queued per connection before the app waits for the client
WRITE_LOW_WATER = 256 * 1024
LINGER_SECONDS = 2.0  # after an error response: read and discard what the client still sends, then close
_TCP_INFO_SIZE = 232
_BYTES_ACKED_OFFSET = 120  # struct tcp_info.tcpi_bytes_acked (Linux >= 4.1)


class _HeaderLimit(Exception):
    """Raised from a parser callback to stop parsing a request with too many header fields."""


@dataclass(frozen=True)
class EdgeLimits:
    """The connection limits (see the module docstring); on_reject counts refusals by code."""

    max_header_bytes: int
    max_headers: int
    header_timeout: float
    body_timeout: float
    send_timeout: float
    max_connections: int
    on_reject: Callable[[str], None] | None = None

    @classmethod
    def from_settings(cls, settings, max_connections: int,
                      on_reject: Callable[[str], None] | None = None) -> EdgeLimits:
        """The limits from the server settings, with the connection cap already resolved."""
        return cls(settings.max_header_bytes, settings.max_headers, settings.header_timeout,
                   settings.body_timeout, settings.send_timeout, max_connections, on_reject)


class Notices:
    """Warnings about refused or cut connections: at most one line per kind every `every` seconds."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def warn(self, kind: str, message: str, *args: object) -> None:
        """Log `message` unless a `kind` line was written recently (then count it for the next line)."""
        now = time.monotonic()
        if now - self._last.get(kind, -self.every) < self.every:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            return
        self._last[kind] = now
        quiet = self._quiet.pop(kind, 0)
        suffix = f" ({quiet} more like it in the last {self.every:.0f}s)" if quiet else ""
        log.warning(message + suffix, *args)


class Connections:
    """The open client connections, least recently active first."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: OrderedDict[EdgeProtocol, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, conn: EdgeProtocol) -> bool:
        """Register a new connection, closing the stalest idle one if at the cap; False if none is idle."""
        if len(self._open) >= self.cap:
            victim = next((c for c in self._open if c.idle()), None)
            if victim is None:
                return False
            self.drop(victim)
            victim.transport.abort()
            conn.notices.warn("evict", "connection limit (%d) reached: closed an idle connection to admit a "
                                       "new one", self.cap)
        self._open[conn] = None
        return True

    def touch(self, conn: EdgeProtocol) -> None:
        """The connection was active: it becomes the last to be evicted."""
        if conn in self._open:
            self._open.move_to_end(conn)

    def drop(self, conn: EdgeProtocol) -> None:
        """Forget a closed connection."""
        self._open.pop(conn, None)

    def abort_all(self) -> int:
        """Close every connection now (forced shutdown); how many were open."""
        conns = list(self._open)
        self._open.clear()
        for conn in conns:
            conn.transport.abort()
        return len(conns)


class EdgeProtocol(HttpToolsProtocol):
    """HttpToolsProtocol plus header caps, header/body timeouts, the connection cap, a send watchdog."""

    limits: ClassVar[EdgeLimits]
    edge_connections: ClassVar[Connections]
    notices: ClassVar[Notices]

    # connection lifetime
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_headers = True  # waiting for (the rest of) a request line and headers
        self._header_bytes = 0
        self._header_count = 0
        self._requests = 0  # requests whose headers are complete
        self._timer = None  # the header, body or linger timer (one phase at a time)
        self._send_watch = None
        self._acked_mark = self._pending_mark = 0
        self._progress_at = 0.0
        self._lingering = False
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if not self.edge_connections.admit(self):
            self.notices.warn("busy", "connection limit (%d) reached and every connection is busy: refused "
                                      "a new one with 503", self.edge_connections.cap)
            self._respond_and_close(503, "The server has too many open connections. Retry shortly.",
                                    "too_many_connections", kind="server_error", linger=False,
                                    extra=[(b"retry-after", b"1")])
            return
        self._arm(self.limits.header_timeout, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.edge_connections.drop(self)
        self._cancel_timer()
        if self._send_watch is not None:
            self._send_watch.cancel()
            self._send_watch = None
        super().connection_lost(exc)

    def idle(self) -> bool:
        """No request is being answered and nothing waits to be sent: safe to close."""
        cycle = self.cycle
        busy = cycle is not None and not cycle.response_complete and not cycle.disconnected
        return not busy and not self.pipeline and not self.transport.get_write_buffer_size()

    # reading: cap the request line and headers
    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # an error was answered: discard what the client still sends
        if not self._in_headers:
            self._feed(data)
            return
        room = self.limits.max_header_bytes - self._header_bytes
        if len(data) <= room:
            self._header_bytes += len(data)
            self._feed(data)
            return
        self._header_bytes += room
        done = self._requests
        if room:
            self._feed(data[:room])
        if self.transport.is_closing() or self._lingering:
            return
        if self._requests == done:
            self._reject(431, f"The request line and headers are larger than {self.limits.max_header_bytes} "
                              "bytes.")
            return
        self.data_received(data[room:])  # the headers ended within the cap: go on with the rest

    def _feed(self, data: bytes) -> None:
        """uvicorn's data_received, telling a header-count refusal (431) from a malformed request (400)."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeaderLimit):
                self._reject(431, f"The request has more than {self.limits.max_headers} header fields.")
            else:
                self._bad_request()
        except httptools.HttpParserError:
            self._bad_request()
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _bad_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    # parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            raise _HeaderLimit()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._requests += 1
        self._in_headers = False
        self.edge_connections.touch(self)
        self._arm(self.limits.body_timeout, self._body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel_timer()
        super().on_message_complete()
        self._in_headers = True
        self._header_bytes = 0
        if self.cycle is None or self.cycle.response_complete:  # answered before the body ended
            self._arm(self.limits.header_timeout, self._header_timeout)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.get_write_buffer_size():
            self._watch_send()
        if self.transport.is_closing():
            return
        self.edge_connections.touch(self)
        if self._in_headers and not self.pipeline:
            self._arm(self.limits.header_timeout, self._header_timeout)

    # timeouts
    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        cycle = self.cycle
        if self.transport.is_closing() or not self._in_headers or (
                cycle is not None and not cycle.response_complete and not cycle.disconnected):
            return
        if self._header_bytes:
            self._reject(408, f"The request headers did not arrive within {self.limits.header_timeout:g} "
                              "seconds.", code="request_timeout")
        else:
            self.transport.close()  # an idle connection: nothing to answer

    def _body_timeout(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self.pipeline:  # queued behind a response in progress: no clean way to answer in order
            self._count("request_timeout")
            self.transport.abort()
        elif cycle is not None and not cycle.response_started:
            cycle.disconnected = True  # the app sees http.disconnect; anything it sends is dropped
            cycle.message_event.set()
            self._reject(408, f"The request body did not arrive within {self.limits.body_timeout:g} seconds.",
                         code="request_timeout")
        else:
            self._count("request_timeout")
            self.transport.close()

    # answering at the protocol level
    def _reject(self, status: int, message: str, code: str = "request_header_fields_too_large") -> None:
        """Answer an error and close; if an earlier request is still being answered, close after it."""
        self.notices.warn(code, "%d %s from %s: %s", status, code, self._peer(), message)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.disconnected:
            self._count(code)
            self._lingering = True  # read nothing more; the running response ends the connection
            cycle.keep_alive = False
            return
        self._respond_and_close(status, message, code)

    def _respond_and_close(self, status: int, message: str, code: str, kind: str = "invalid_request_error",
                           linger: bool = True, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        self._count(code)
        body = json.dumps(error_body(message, kind, None, code)).encode()
        headers = [*self.server_state.default_headers, (b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close"), *(extra or [])]
        head = b"".join([STATUS_LINE[status], *(n + b": " + v + b"\r\n" for n, v in headers), b"\r\n"])
        self.transport.write(head + body)
        if not linger:
            self.transport.close()
            return
        # half-close and discard what the client still sends for a moment, so that it reads this answer
        # instead of a connection reset
        self._lingering = True
        self._cancel_timer()
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = self.loop.call_later(LINGER_SECONDS, self._end_linger)

    def _end_linger(self) -> None:
        self._timer = None
        self.transport.close()  # what is still queued goes out at the client's pace, under the send watch
        if self.transport.get_write_buffer_size():
            self._watch_send()

    def _count(self, code: str) -> None:
        if self.limits.on_reject is not None:
            self.limits.on_reject(code)

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "-"

    # writing: a client that takes no data
    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_send()

    def _watch_send(self) -> None:
        """Check the client's progress while output waits for it (until it is all out, or the cut)."""
        if self._send_watch is not None:
            return
        self._acked_mark = self._acked()
        self._pending_mark = self.transport.get_write_buffer_size()
        self._progress_at = self.loop.time()
        self._send_watch = self.loop.call_later(self._tick(), self._check_send)

    def _tick(self) -> float:
        return min(1.0, self.limits.send_timeout / 4)

    def _check_send(self) -> None:
        self._send_watch = None
        pending = self.transport.get_write_buffer_size()
        if not pending and not self.flow.write_paused:
            return  # everything was handed to the kernel
        acked, now = self._acked(), self.loop.time()
        if acked > self._acked_mark or pending < self._pending_mark:
            self._progress_at = now
        self._acked_mark, self._pending_mark = acked, pending
        if now - self._progress_at >= self.limits.send_timeout:
            record = self._record()
            self.notices.warn("send_timeout", "client %s (request %s) took no data for %gs with %d bytes waiting: "
                                              "disconnected", self._peer(), getattr(record, "request_id", "-"),
                              self.limits.send_timeout, pending)
            if record is not None and not self.cycle.response_complete:
                record.outcome = "cut:send_timeout"  # for the access log (see server.middleware)
            self._count("send_timeout")
            self.transport.abort()
            return
        self._send_watch = self.loop.call_later(self._tick(), self._check_send)

    def _record(self):
        """The request's RequestRecord (server.middleware), if the app has put one in the scope's state."""
        if self.cycle is None:
            return None
        return self.cycle.scope.get("state", {}).get("record")

    def _acked(self) -> int:
        """Bytes the client's TCP stack has acknowledged (-1 where the OS does not say)."""
        sock = self.transport.get_extra_info("socket")
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        except (AttributeError, OSError):
            return -1
        if len(info) < _BYTES_ACKED_OFFSET + 8:
            return -1
        return struct.unpack_from("Q", info, _BYTES_ACKED_OFFSET)[0]


def protocol_class(limits: EdgeLimits) -> type[EdgeProtocol]:
    """An EdgeProtocol subclass bound to these limits and a fresh connection registry (for uvicorn's `http`)."""
    attrs = {"limits": limits, "edge_connections": Connections(limits.max_connections), "notices": Notices()}
    return type("EdgeProtocol", (EdgeProtocol,), attrs)
