"""uvicorn's httptools protocol with the limits a server on an open network needs.

- Request line + headers: at most `max_header_bytes` bytes and `max_headers` fields, else 431 (nothing
  beyond the cap is buffered or parsed). A chunked body's trailer fields are capped the same way (431).
- Body: at most `max_body_wire_bytes` bytes on the wire after the headers (the body, as much again for
  chunk framing, and trailers), else 413; the app enforces `max_body_bytes` on the body itself.
- Time: complete headers within `header_timeout` of connecting or of the first byte of a request (else
  the connection is closed, with a 408 if part of a request came); idle keep-alive connections between
  requests are closed by uvicorn after `timeout_keep_alive`; the whole body within `body_timeout` of its
  request's turn (a pipelined request waits unread behind the response before it: not timed), else 408.
- Connections: at most `max_connections`; a newcomer over the cap closes the least recently active
  connection with no request in progress, or gets 503 when every connection is busy.
- Slow readers: a response's output is queued (up to WRITE_HIGH_WATER bytes) rather than blocking the
  app, and a client that takes no data for `send_timeout` while output waits is disconnected (the app
  sees http.disconnect). Progress is what the client's TCP stack acknowledges, so a client that reads
  slowly but steadily is never cut, while one that reads nothing cannot be sent a final event.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable
from typing import ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from server.errors import error_body
from server.http_limits import Connections, EdgeLimits, Notices

__all__ = ["EdgeLimits", "EdgeProtocol", "protocol_class"]

WRITE_HIGH_WATER = 1024 * 1024  # output queued per connection before the app waits for the client
WRITE_LOW_WATER = 256 * 1024
LINGER_SECONDS = 2.0  # after an error response: read and discard what the client still sends, then close
_TCP_INFO_SIZE = 232
_BYTES_ACKED_OFFSET = 120  # struct tcp_info.tcpi_bytes_acked (Linux >= 4.1)


class _HeaderLimit(Exception):
    """Raised from a parser callback to stop parsing a request with too many header fields."""


class EdgeProtocol(HttpToolsProtocol):
    """HttpToolsProtocol plus header caps, header/body timeouts, the connection cap, a send watchdog."""

    limits: ClassVar[EdgeLimits]
    edge_connections: ClassVar[Connections]
    notices: ClassVar[Notices]

    # connection lifetime
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_headers = True  # waiting for (the rest of) a request line and headers
        self._begun = False  # some of the next request has come (so a header timeout answers 408)
        self._header_bytes = self._header_count = 0
        self._requests = self._messages = 0  # requests whose headers / whole message are in
        self._body_bytes = 0  # wire bytes since the current request's headers (body, framing, trailers)
        self._trailer_bytes = 0
        self._trailing = False  # after a chunk-size line, before its data: trailers if it was the last
        self._bodies = 0  # on_body calls (chunk data seen)
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

    # reading: cap the request line and headers, the body's wire bytes and its trailers
    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # an error was answered: discard what the client still sends
        if not self._in_headers:
            self._receive_body(data)
            return
        self._next_request_begun()
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

    def _receive_body(self, data: bytes) -> None:
        """Feed body-phase bytes: at most max_body_wire_bytes per request (413), trailers as headers (431).

        Bytes that arrive right after a chunk-size line and bring no chunk data are trailer fields (the
        size was 0), which the parser buffers like headers. Those in the read that carried the last chunk
        itself are not counted: at most one read (256 KiB) more.
        """
        trailing, bodies, done = self._trailing, self._bodies, self._messages
        if trailing:
            room = max(0, self.limits.max_header_bytes - self._trailer_bytes)
        else:
            room = max(0, self.limits.max_body_wire_bytes - self._body_bytes)
        part = data[:room]
        self._body_bytes += len(part)
        if part:
            self._feed(part)
        if self.transport.is_closing() or self._lingering:
            return
        in_trailers = trailing and self._bodies == bodies and self._messages == done
        if in_trailers:
            self._trailer_bytes += len(part)
        if len(part) == len(data):
            return
        if self._messages != done or (trailing and not in_trailers):
            self.data_received(data[len(part):])  # the message (or the trailer guess) ended: go on
        elif in_trailers:
            self._refuse_body(431, f"The request's trailer fields are larger than "
                                   f"{self.limits.max_header_bytes} bytes.", "request_header_fields_too_large")
        else:
            self._refuse_body(413, f"The request body is larger than {self.limits.max_body_bytes} bytes "
                                   f"({self.limits.max_body_wire_bytes} bytes on the wire with its chunked "
                                   "framing).", "request_too_large")

    def _next_request_begun(self) -> None:
        """Bytes of a next request: its header timeout runs from now (an idle connection is uvicorn's
        keep-alive timer's)."""
        self._begun = True
        if self._timer is None:
            self._unset_keepalive_if_required()
            self._arm(self.limits.header_timeout, self._header_timeout)

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
        self._next_request_begun()  # also when it came in the read that ended the previous request

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1  # trailer fields count too
        if self._header_count > self.limits.max_headers:
            raise _HeaderLimit()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._requests += 1
        self._in_headers = self._begun = self._trailing = False
        self._body_bytes = self._trailer_bytes = 0
        self._cancel_timer()  # the body timer starts with the request's turn (_start_asgi_task)
        self.edge_connections.touch(self)
        super().on_headers_complete()

    def _start_asgi_task(self, cycle, app) -> None:
        super()._start_asgi_task(cycle, app)
        if cycle is self.cycle and not self._in_headers:  # its body is still to come
            self._arm(self.limits.body_timeout, self._body_timeout)

    def on_chunk_header(self) -> None:
        self._trailing = True
        self._trailer_bytes = 0

    def on_chunk_complete(self) -> None:
        self._trailing = False

    def on_body(self, body: bytes) -> None:
        self._bodies += 1
        self._trailing = False
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._messages += 1
        self._trailing = False
        self._cancel_timer()
        super().on_message_complete()
        self._in_headers = True
        self._header_bytes = 0
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and not self.transport.is_closing() \
                and self.timeout_keep_alive_task is None:  # answered before the body ended: now idle
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timer, or starts a pipelined request
        if self.transport.get_write_buffer_size():
            self._watch_send()
        if self.transport.is_closing():
            return
        self.edge_connections.touch(self)
        if self._in_headers and self._begun and not self.pipeline:  # a next request has begun
            self._unset_keepalive_if_required()
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
            return  # (re-armed when the response is complete)
        if self._begun:
            self._reject(408, f"The request headers did not arrive within {self.limits.header_timeout:g} "
                              "seconds.", code="request_timeout")
        else:
            self.transport.close()  # an idle connection: nothing to answer

    def _body_timeout(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self._refuse_body(408, f"The request body did not arrive within {self.limits.body_timeout:g} "
                                   "seconds.", "request_timeout")

    def _refuse_body(self, status: int, message: str, code: str) -> None:
        """End a request whose body cannot be taken: answer it if its response has not started."""
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and not self.pipeline:
            self._count(code)  # answered already (e.g. the app's own 413): stop reading the rest
            self._lingering = True
            self.transport.close()
        elif cycle is not None and not cycle.response_started and not self.pipeline:
            cycle.disconnected = True  # the app sees http.disconnect; anything it sends is dropped
            cycle.message_event.set()
            self._reject(status, message, code=code)
        else:  # a response is in progress (this one's, or one before it): read no more, close after it
            self._reject(status, message, code=code)

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
