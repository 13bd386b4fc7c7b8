"""Shutdown shared by the HTTP server and the service: stop requested -> drain (grace) -> cut -> exit."""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("gpt4all_j_server")


class Lifecycle:
    """Who is running, and when running generations must end.

    `stopping` is set by the first SIGTERM/SIGINT: new generations are refused (503) and running
    ones get `grace` seconds to finish; then `cut` is set and every running generation ends at
    once with an error event (streams) or a 503 (non-streamed), so no response ends silently.
    A second signal sets `cut` straight away.
    """

    def __init__(self, grace: float, progress_every: float = 5.0) -> None:
        self.grace = grace
        self.progress_every = progress_every
        self.stopping = asyncio.Event()
        self.cut = asyncio.Event()
        self.active: set[object] = set()  # one token per running generation request
        self._drain: asyncio.Task | None = None

    def enter(self, token: object) -> None:
        """A generation request starts."""
        self.active.add(token)

    def leave(self, token: object) -> None:
        """A generation request ended (any way)."""
        self.active.discard(token)

    def request_stop(self) -> None:
        """First signal: start draining (call on the event loop's thread)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self._drain = asyncio.get_running_loop().create_task(self._drain_loop())

    def force(self) -> None:
        """Second signal: end every running generation now."""
        self.stopping.set()
        if not self.cut.is_set():
            log.warning("second signal: ending %d running request(s) now", len(self.active))
        self.cut.set()

    async def _drain_loop(self) -> None:
        """Log drain start and progress; set `cut` when the grace period is over."""
        start = time.monotonic()
        log.info("shutting down: %d request(s) running, waiting up to %.0fs for them to finish",
                 len(self.active), self.grace)
        while self.active and not self.cut.is_set():
            left = self.grace - (time.monotonic() - start)
            if left <= 0:
                log.warning("shutdown grace of %.0fs is over: ending %d running request(s) with an error",
                            self.grace, len(self.active))
                self.cut.set()
                break
            try:
                await asyncio.wait_for(self.cut.wait(), min(self.progress_every, left))
            except asyncio.TimeoutError:
                if self.active:
                    log.info("shutting down: %d request(s) still running, %.0fs of grace left",
                             len(self.active), max(0.0, self.grace - (time.monotonic() - start)))
        if not self.active:
            log.info("shutting down: no requests running (drained in %.1fs)", time.monotonic() - start)

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until no generation is running (or timeout); True if drained."""
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.active
