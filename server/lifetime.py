"""The one owner of a generation request's lifetime: admitted on entry, ended once on exit, whatever ends it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from server.lifecycle import Lifecycle
from server.middleware import RequestRecord
from server.request_watch import Guard, Watch
from server.runner import Run
from server.tracking import Tracker

Body = TypeVar("Body")


class Generation(Guard):
    """One generation request, as an async context manager.

    Entering admits it (503 server_shutting_down once the server is stopping); `launch` submits its jobs
    and starts the watch (client disconnect, shutdown cut). Leaving the block for any reason — the body
    was built, an APIError, a bug, the handler task cancelled — ends it through `finish` (Guard): the watch
    stops, unfinished jobs are cancelled, the accounting closes and the outcome is recorded, once.
    A streamed request is handed over to its stream body instead, whose generator's end (or the route's
    close after the response, if it never ran) ends it the same way.
    """

    def __init__(self, record: RequestRecord, lifecycle: Lifecycle | None, retry_after: int,
                 disconnected: Callable) -> None:
        super().__init__(record, lifecycle)
        self.retry_after = retry_after
        self.disconnected = disconnected
        self.handed_over = False

    async def __aenter__(self) -> Generation:
        self.admit(self.retry_after)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is not None or not self.handed_over:
            self.finish(exc)
        return False

    def launch(self, run: Run, tracker: Tracker) -> None:
        """Submit the run's jobs (all or none) and watch them; from now on its end cancels them and closes
        the tracker (a request refused at submission counts no tokens)."""
        self.own(run=run)
        run.submit()
        self.own(watch=Watch(run, self, self.disconnected, self.retry_after), tracker=tracker)

    async def first(self) -> None:
        """Wait until a job has started; a failure first (queue timeout, ...) or the shutdown cut raise."""
        if self.watch is None:
            raise RuntimeError("first() before launch()")
        await self.watch.first()

    def hand_over(self, body: Body) -> Body:
        """Give the request to its stream body, which ends it from now on; leaving the block does not."""
        self.handed_over = True
        return body
