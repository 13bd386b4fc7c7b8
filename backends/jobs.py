"""Server-side records of jobs and worker processes, and the pool's exceptions."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from backends.types import Event, Failed, Finished, GenerationJob, ModelLimits


class QueueFull(Exception):
    """The model's wait queue is full; the client should retry later."""


class ModelUnavailable(Exception):
    """The model has no live workers (crash loop, or shutting down)."""


@dataclass(frozen=True)
class PoolModel:
    """What the pool needs to know to serve one model."""

    name: str
    path: str
    workers: int = 1
    threads: int = 1
    batch_size: int = 8
    max_queue: int = 64
    prefix_cache: bool = True
    flush_interval: float = 0.0  # seconds; tokens closer together than this are sent in one message
    pieces: tuple[bytes, ...] = ()  # the vocabulary (token id -> bytes); read from the file when empty


@dataclass(frozen=True)
class PoolPolicy:
    """Time limits and crash handling shared by every model's pool."""

    queue_timeout: float = 0.0  # 0 = wait as long as it takes
    restart_limit: int = 5
    restart_window: float = 60.0
    restart_cooldown: float = 30.0


class JobHandle:
    """A submitted job: its events go to a sink as (tag, event); cancellable at any time."""

    def __init__(self, job: GenerationJob, pool, sink: asyncio.Queue | None = None, tag: int = 0) -> None:
        self.job = job
        self._pool = pool
        self._events: asyncio.Queue = sink if sink is not None else asyncio.Queue()
        self.tag = tag
        self.worker: WorkerProc | None = None
        self.done = False
        self.cancel_sent = False
        self.submitted_at = time.monotonic()
        self.dispatched_at: float | None = None
        self.timer: asyncio.TimerHandle | None = None

    def deliver(self, event: Event) -> None:
        """Called by the pool with each event for this job."""
        if isinstance(event, (Finished, Failed)):
            self.done = True
        self._events.put_nowait((self.tag, event))

    def cancel(self) -> None:
        """Stop the job: drop it from the queue or stop its worker between tokens."""
        if not self.done:
            self._pool.cancel(self)

    @property
    def queue_wait(self) -> float | None:
        """Seconds between submission and dispatch to a worker."""
        return None if self.dispatched_at is None else self.dispatched_at - self.submitted_at


@dataclass
class WorkerProc:
    """Server-side record of one worker process."""

    index: int
    process: object
    conn: object
    limits: ModelLimits | None = None
    job: JobHandle | None = None
    ready: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    alive: bool = True
    cached: list[int] = field(default_factory=list)  # the server's view of the tokens in its KV cache
    last_used: float = 0.0  # when it last got a job (least recently used wins ties)
