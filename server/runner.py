"""Runs one request's jobs on the pool: submit, merge their events, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from backends.engine_api import Engine, JobGroup, JobTicket, ModelUnavailable, QueueFull
from backends.types import ErrorKind, Failed, Finished, GenerationJob, Started
from server.errors import APIError
from server.params import Plan


def failure_to_error(event: Failed, param: str = "prompt", retry_after: int = 1) -> APIError:
    """Map an engine failure to the HTTP error the client sees."""
    if event.kind == ErrorKind.QUEUE_TIMEOUT:
        return APIError(503, f"The server is overloaded: {event.message}. Retry shortly.",
                        type="server_error", code="queue_timeout", headers={"Retry-After": str(retry_after)})
    if event.kind == ErrorKind.UNAVAILABLE:
        wait = event.retry_after or retry_after
        return APIError(503, f"The model is unavailable: {event.message}. Retry in {wait}s.",
                        type="server_error", code="model_unavailable", headers={"Retry-After": str(wait)})
    if event.kind == ErrorKind.CONTEXT_LENGTH:
        return APIError(400, event.message, param=param, code="context_length_exceeded")
    if event.kind == ErrorKind.INVALID_REQUEST:
        return APIError(400, event.message, param=param, code="invalid_prompt")
    return APIError(500, f"The model failed while generating: {event.message}", type="server_error",
                    code="internal_error")


class Run:
    """The n × prompts jobs of one request, as one merged stream of (choice index, event).

    The jobs share one JobGroup: the queue timeout applies until the first of them reaches a
    worker, and the time limit is one deadline for all of them, counted from then.
    """

    def __init__(self, pool: Engine, plan: Plan, retry_after: int, time_limit: float | None = None) -> None:
        self.pool = pool
        self.plan = plan
        self.retry_after = retry_after
        self.time_limit = time_limit
        self.sink: asyncio.Queue = asyncio.Queue()
        self.handles: list[JobTicket] = []
        self.group = JobGroup()
        self.started: dict[int, Started] = {}
        self._early: list[tuple[int, object]] = []  # events seen by wait_first, replayed by events
        self._open: set[int] = set()

    def submit(self) -> None:
        """Queue every job, or none: a full queue rejects the whole request with 503."""
        plan = self.plan
        jobs = len(plan.prompts) * plan.n
        capacity = self.pool.status().capacity  # the engine's slots and its queue
        if jobs > capacity:  # could never fit, so retrying would not help: a 400, not a 503
            raise APIError(400, f"This request needs {jobs} generations (prompts x n), but model "
                                f"{self.pool.name} can take at most {capacity} at once.",
                           param="n", code="too_many_generations")
        try:
            for p, prompt in enumerate(plan.prompts):
                for i in range(plan.n):
                    index = p * plan.n + i
                    job = GenerationJob(
                        job_id=self.pool.new_job_id(), prompt=prompt, max_tokens=plan.max_tokens,
                        sampling=plan.seed_for(index), logprobs=plan.logprobs,
                        time_limit=self.time_limit, reuse_prefix=self.pool.prefix_cache,
                    )
                    self.queue(index, job)
        except (QueueFull, ModelUnavailable) as exc:
            self.cancel()
            raise self.refused(exc) from None

    def queue(self, index: int, job: GenerationJob) -> None:
        """Submit one job whose events carry `index`; QueueFull or ModelUnavailable if the engine refuses it."""
        self.handles.append(self.pool.submit(job, self.sink, index, self.group))
        self._open.add(index)

    def refused(self, exc: QueueFull | ModelUnavailable) -> APIError:
        """The 503 for a job the engine refused: its queue is full, or it has nothing to run jobs on."""
        if isinstance(exc, QueueFull):
            return APIError(503, "The server is overloaded: this model's queue is full. Retry shortly.",
                            type="server_error", code="queue_full", headers={"Retry-After": str(self.retry_after)})
        wait = exc.retry_after or self.retry_after
        return APIError(503, f"The {exc}. Retry in {wait}s.", type="server_error", code="model_unavailable",
                        headers={"Retry-After": str(wait)})

    async def wait_first(self) -> None:
        """Wait until a job has started (so a stream can begin) or the first one failed (an HTTP error)."""
        while not self.started:
            index, event = await self.sink.get()
            self._early.append((index, event))
            if isinstance(event, Started):
                self.started[index] = event
            elif isinstance(event, Failed):
                raise self.fail(event)
            elif isinstance(event, Finished):  # cancelled while queued: the client went away
                raise APIError(499, "The client closed the request.", code="client_closed_request")

    async def events(self) -> AsyncIterator[tuple[int, object]]:
        """(choice index, event) for every job, until all have finished or failed."""
        early, self._early = self._early, []
        for index, event in early:
            self._track(event, index)
            yield index, event
        while self._open:
            index, event = await self.sink.get()
            if isinstance(event, Started):
                self.started[index] = event
            self._track(event, index)
            yield index, event

    def drain(self) -> list[tuple[int, object]]:
        """Events that have already arrived (to coalesce tokens when the client is slower than the engine)."""
        out = []
        while self._open and not self.sink.empty():
            index, event = self.sink.get_nowait()
            if isinstance(event, Started):
                self.started[index] = event
            self._track(event, index)
            out.append((index, event))
        return out

    def _track(self, event: object, index: int) -> None:
        if isinstance(event, (Finished, Failed)):
            self._open.discard(index)

    def fail(self, event: Failed) -> APIError:
        """The HTTP error for a job's failure (raising it ends the request, which cancels the other jobs)."""
        return failure_to_error(event, self.plan.prompt_param, self.retry_after)

    def cancel(self, index: int | None = None) -> None:
        """Cancel one job (by choice index) or all of them."""
        for handle in self.handles:
            if index is None or handle.tag == index:
                handle.cancel()
