"""The engine seam: what the HTTP side (and anything else that runs generations) may use of an engine.

An engine serves one model: it takes jobs (`submit`), stops them (`cancel`), and says how it is doing
(`status`, a plain snapshot). The pool of ctransformers worker processes (backends.pool.ModelPool,
one sequence per process) is one implementation; the server is typed against these protocols only and
never names an implementation (backends.engine, backends.worker, backends.pool). `Engines` is the set
of served models (backends.pool.WorkerPool), with a snapshot of every model, served or not yet.

Events a job produces go to its sink as (tag, event) with the types of backends.types.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from backends.types import GenerationJob, ModelLimits

# a model's state as the engine side sees it (the registry adds `not_downloaded` and `skipped`)
READY = "ready"  # takes requests and has something loaded to run them on
LOADING = "loading"  # not started yet (first load under way)
FAILED = "failed"  # its start failed; it is retried with backoff (`retry_in` says when)
RESTARTING = "restarting"  # takes requests, but nothing is loaded right now: jobs wait for a replacement
UNAVAILABLE = "unavailable"  # refuses jobs (crash cooldown, or shutting down)
STARTED_STATES = (READY, RESTARTING, UNAVAILABLE)  # the engine exists: it has a live status


class QueueFull(Exception):
    """The model's wait queue is full; the client should retry later."""


class ModelUnavailable(Exception):
    """The model has nothing to run jobs on (crash loop, or shutting down)."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds until it is worth retrying; None = unknown


@dataclass
class JobGroup:
    """The jobs of one request: the queue timeout ends and the time limit starts at its first dispatch."""

    started: bool = False  # a job of the request has started running: the others no longer expire
    deadline: float | None = None  # monotonic end of the request's time limit, shared by its jobs


@dataclass(frozen=True)
class ModelStatus:
    """A snapshot of one model's engine, taken at one moment; never changes afterwards."""

    name: str
    state: str  # READY, LOADING, FAILED, RESTARTING or UNAVAILABLE
    available: bool  # takes jobs now
    slots: int  # sequences it can run at once, at full strength
    running: int  # sequences running now
    queued: int  # jobs waiting for a slot
    queue_capacity: int  # jobs that may wait beyond the slots
    processes: int  # engine processes it runs at full strength
    alive: int  # engine processes loaded and running now
    restarts: int  # processes replaced after a crash
    problem: str | None  # why it is not at full strength (or not started); None = healthy
    pids: tuple[int, ...] = ()  # its live processes
    retry_in: int | None = None  # FAILED: whole seconds until the next start attempt

    @property
    def capacity(self) -> int:
        """Jobs it can hold at once (running + waiting): more than this from one request can never fit."""
        return self.slots + self.queue_capacity

    @property
    def started(self) -> bool:
        """The engine exists (it may still be restarting or in a crash cooldown)."""
        return self.state in STARTED_STATES


@runtime_checkable
class JobTicket(Protocol):
    """A submitted job, as its submitter sees it."""

    tag: int  # the tag its events carry in the sink
    done: bool  # finished or failed

    @property
    def queue_wait(self) -> float | None:
        """Seconds between submission and the start of its run; None until it started."""

    def cancel(self) -> None:
        """Stop it: drop it from the queue, or stop its run between two tokens (ends as CANCELLED)."""


@runtime_checkable
class Engine(Protocol):
    """One served model."""

    @property
    def name(self) -> str:
        """The model id."""

    @property
    def prefix_cache(self) -> bool:
        """Whether jobs should reuse the prompt prefix the engine already evaluated."""

    @property
    def limits(self) -> ModelLimits | None:
        """Context length, vocabulary size and EOS, once loaded."""

    @property
    def pieces(self) -> tuple[bytes, ...]:
        """The vocabulary: token id -> bytes."""

    def new_job_id(self) -> int:
        """A job id unique within this model."""

    def submit(self, job: GenerationJob, sink: asyncio.Queue | None = None, tag: int = 0,
               group: JobGroup | None = None) -> JobTicket:
        """Queue a job (FIFO); events go to sink as (tag, event). Raises ModelUnavailable or QueueFull."""

    def cancel(self, ticket: JobTicket) -> None:
        """Stop a job (as JobTicket.cancel)."""

    def status(self) -> ModelStatus:
        """A snapshot of its state and counts."""


@runtime_checkable
class Engines(Protocol):
    """Every served model's engine."""

    def get(self, name: str) -> Engine | None:
        """The engine serving a model, if it has started."""

    def status(self) -> dict[str, ModelStatus]:
        """A snapshot of every model it was given, started or not, in the order it was given them."""

    def retry_in(self, name: str) -> int | None:
        """Whole seconds until the next start attempt of a model in FAILED; None otherwise."""

    async def start(self) -> None:
        """Start every model (those that fail are retried in the background)."""

    async def stop(self) -> None:
        """Stop every model."""
