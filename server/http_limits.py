"""The edge protocol's limits and bookkeeping (see server.http_protocol): the limits, rate-limited
warnings, and the registry of open connections behind the connection cap."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.http_protocol import EdgeProtocol

log = logging.getLogger("gpt4all_j_server.http")


@dataclass(frozen=True)
class EdgeLimits:
    """The connection limits (see server.http_protocol); on_reject counts refusals by code."""

    max_header_bytes: int
    max_headers: int
    header_timeout: float
    body_timeout: float
    send_timeout: float
    max_connections: int
    on_reject: Callable[[str], None] | None = None
    max_body_bytes: int = 4 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings, max_connections: int,
                      on_reject: Callable[[str], None] | None = None) -> EdgeLimits:
        """The limits from the server settings, with the connection cap already resolved."""
        return cls(settings.max_header_bytes, settings.max_headers, settings.header_timeout,
                   settings.body_timeout, settings.send_timeout, max_connections, on_reject,
                   settings.max_body_bytes)

    @property
    def max_body_wire_bytes(self) -> int:
        """Bytes a request may send after its headers: the body, as much again for chunked framing (chunk
        size lines and extensions), and its trailer fields."""
        return 2 * self.max_body_bytes + self.max_header_bytes


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
