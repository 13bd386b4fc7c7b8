"""One generation request's end (Guard: lifecycle, what stops with it, outcome) and what ends it early (Watch)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from server.errors import APIError, internal_error, shutting_down
from server.lifecycle import Lifecycle
from server.middleware import RequestRecord
from server.runner import Run
from server.tracking import Tracker

log = logging.getLogger(__name__)

SHUTDOWN = object()  # put into a run's event queue when the shutdown grace is over (see Watch)
CLOSED = GeneratorExit()  # how a stream closed before its end ended (see Guard.outcome_of)


class Guard:
    """One generation request: its place in the shutdown lifecycle, what stops when it ends, and how it ended.

    `finish` is the one way a request ends, whatever ends it: it stops the watch, cancels the jobs still
    running, closes the accounting, records the outcome (the access log's) and leaves the lifecycle, once.
    """

    def __init__(self, record: RequestRecord, lifecycle: Lifecycle | None) -> None:
        self.record, self.lifecycle = record, lifecycle
        self.client_gone = False  # set by the watch when the client disconnected
        self.cut = False  # set by the watch when the shutdown grace was over
        self.ended = False
        self.run: Run | None = None
        self.watch: Watch | None = None
        self.tracker: Tracker | None = None

    def admit(self, retry_after: int) -> None:
        """Register the request; 503 server_shutting_down once a stop was requested."""
        if self.lifecycle is not None:
            if self.lifecycle.stopping.is_set():
                self.ended = True
                self.record.outcome = "error:server_shutting_down"
                raise shutting_down(retry_after)
            self.lifecycle.enter(self)

    def own(self, run: Run | None = None, watch: Watch | None = None, tracker: Tracker | None = None) -> None:
        """What ends with the request: its jobs (cancelled), its watch (stopped), its accounting (closed)."""
        self.run = run or self.run
        self.watch = watch or self.watch
        self.tracker = tracker or self.tracker

    def see(self, index: int, event: object) -> None:
        """Note one engine event: the shutdown marker raises 503 server_shutting_down, the rest is counted."""
        if self.watch is not None:
            self.watch.check(event)
        if self.tracker is not None:
            self.tracker.see(index, event)

    def stop(self) -> None:
        """Stop watching and cancel every job still running (again is harmless)."""
        if self.watch is not None:
            self.watch.stop()
        if self.run is not None:
            self.run.cancel()

    def failure(self, exc: Exception) -> APIError:
        """Stop the jobs now; the error the client sees for exc (a bug is logged and is an internal_error)."""
        self.stop()
        if isinstance(exc, APIError):
            return exc
        log.exception("stream failed", exc_info=exc)
        return internal_error()

    def outcome_of(self, exc: BaseException | None) -> str:
        """The outcome of a request that ended with this exception (None: it ended by itself)."""
        if self.cut:
            return "cut:shutdown"
        if self.client_gone:
            return "client_gone"
        if exc is None:
            return "done"
        if isinstance(exc, APIError):
            return f"error:{exc.code or exc.status}"
        if isinstance(exc, Exception):
            return "error:internal_error"
        return "client_gone"  # cancelled, or a stream closed before its end (GeneratorExit)

    def finish(self, exc: BaseException | None) -> None:
        """End the request, ended by exc (None: by itself); the first call counts."""
        if self.ended:
            return
        self.ended = True
        self.stop()
        if self.tracker is not None:
            self.tracker.close()
        if not (self.record.outcome or "").startswith("cut:"):  # e.g. the edge cut a non-reading client
            self.record.outcome = self.outcome_of(exc)
        if self.lifecycle is not None:
            self.lifecycle.leave(self)


class Watch:
    """Ends a run early: cancels it when the client goes away, interrupts it when the shutdown grace is over."""

    def __init__(self, run: Run, guard: Guard, disconnected: Callable, retry_after: int) -> None:
        self.run, self.guard, self.retry_after = run, guard, retry_after
        self._grace_over = guard.lifecycle.cut if guard.lifecycle is not None else None
        self._task = asyncio.ensure_future(self._watch(disconnected))

    async def _watch(self, disconnected: Callable) -> None:
        waits = [asyncio.ensure_future(disconnected())]
        if self._grace_over is not None:
            waits.append(asyncio.ensure_future(self._grace_over.wait()))
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if waits[0] in done:
            self.guard.client_gone = True
            self.run.cancel()
        else:  # whoever reads the run's events meets the marker (Run passes unknown events through)
            self.run.sink.put_nowait((-1, SHUTDOWN))

    async def first(self) -> None:
        """The run's first start (see Run.wait_first), unless the shutdown grace ends first."""
        if self._grace_over is None:
            await self.run.wait_first()
            return
        started = asyncio.ensure_future(self.run.wait_first())
        cut = asyncio.ensure_future(self._grace_over.wait())
        try:
            await asyncio.wait({started, cut}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            started.cancel()  # never leave a reader of the run's events behind
            raise
        finally:
            cut.cancel()
        if not started.done():
            started.cancel()
            self.guard.cut = True  # the request's end cancels its jobs
            raise shutting_down(self.retry_after)
        started.result()

    def check(self, event: object) -> None:
        """Raise 503 server_shutting_down for the shutdown marker (the request's end cancels its jobs)."""
        if event is SHUTDOWN:
            self.guard.cut = True
            raise shutting_down(self.retry_after)

    def stop(self) -> None:
        """Stop watching."""
        self._task.cancel()
