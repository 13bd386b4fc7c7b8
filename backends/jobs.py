"""Server-side records of jobs and worker processes (the exceptions and JobGroup are in backends.engine_api)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace

from backends.engine_api import JobGroup, ModelUnavailable, QueueFull
from backends.types import Event, Failed, Finished, FinishReason, GenerationJob, ModelLimits, Started


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
    engine: str = "ctransformers"  # "ctransformers" (backends.worker) or "ggml" (backends.batched.process)
    slots: int = 1  # jobs one worker process runs at once (ctransformers: 1)
    n_ctx: int | None = None  # ggml: the context its KV cache is sized for (None = the file's)
    chunk: int = 32  # ggml: prompt tokens prefilled per step


@dataclass(frozen=True)
class PoolPolicy:
    """Time limits and crash handling shared by every model's pool."""

    queue_timeout: float = 0.0  # 0 = wait as long as it takes
    restart_limit: int = 5
    restart_window: float = 60.0
    restart_cooldown: float = 30.0
    stall_timeout: float = 60.0  # a busy worker without progress this long is killed and replaced


def out_of_time(group: JobGroup | None) -> bool:
    """The request's shared time limit is over."""
    return group is not None and group.deadline is not None and time.monotonic() >= group.deadline


def with_time_left(job: GenerationJob, group: JobGroup | None, now: float) -> GenerationJob:
    """The job as sent to its worker: the first of a request starts the request's clock (and ends its
    queue timeout); later ones get what is left of the time limit."""
    if group is None:
        return job
    if not group.started:
        group.started = True
        if job.time_limit is not None:
            group.deadline = now + job.time_limit
    if group.deadline is None:
        return job
    return replace(job, time_limit=max(0.0, group.deadline - now))


class JobHandle:
    """A submitted job: its events go to a sink as (tag, event); cancellable at any time."""

    def __init__(self, job: GenerationJob, pool, sink: asyncio.Queue | None = None, tag: int = 0,
                 group: JobGroup | None = None) -> None:
        self.job = job
        self._pool = pool
        self._events: asyncio.Queue = sink if sink is not None else asyncio.Queue()
        self.tag = tag
        self.group = group
        self.worker: WorkerProc | None = None
        self.done = False
        self.cancel_sent = False
        self.submitted_at = time.monotonic()
        self.dispatched_at: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.dispatch_seen: int | None = None  # its worker's progress counter when it was sent

    def deliver(self, event: Event) -> None:
        """Called by the pool with each event for this job."""
        if isinstance(event, (Finished, Failed)):
            self.done = True
        self._events.put_nowait((self.tag, event))

    def cancel(self) -> None:
        """Stop the job: drop it from the queue or stop its worker between tokens."""
        if not self.done:
            self._pool.cancel(self)

    def finish_unstarted(self) -> None:
        """End a job whose request ran out of time before it reached a worker: no tokens, 'length'."""
        self.dispatched_at = time.monotonic()
        job = self.job
        self.deliver(Started(job.job_id, len(job.prompt) if isinstance(job.prompt, list) else 0, 0))
        self.deliver(Finished(job.job_id, FinishReason.LENGTH, 0, timed_out=True))

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
    progress: object = None  # shared counter the worker bumps per token, prompt chunk and job received
    pid: int = 0
    limits: ModelLimits | None = None
    jobs: dict[int, JobHandle] = field(default_factory=dict)  # job id -> the jobs it runs now
    slots: int = 1  # jobs it may run at once
    ready: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    alive: bool = True
    cached: list[int] = field(default_factory=list)  # the server's view of the tokens in its KV cache
    last_used: float = 0.0  # when it last got a job (least recently used wins ties)
    seen: int = 0  # the progress counter at the last check
    dispatch_seen: int = 0  # the progress counter when its current job was sent (unchanged = never taken)
    progress_at: float = 0.0  # when the counter last moved (or a job was dispatched)
    load_error: str | None = None  # what the worker said when it could not load the model
    killed_because: str | None = None  # why the pool killed it (stall, load timeout)
    load_timer: asyncio.TimerHandle | None = None
    spawn_failures: int = 0  # failed attempts to start a replacement for this (dead) worker
    reader: object = None  # backends.pipe_io.FrameReader of conn (whole messages from a non-blocking fd)
    writer: object = None  # backends.pipe_io.FrameWriter of conn (whole messages to it, in order)

    @property
    def job(self) -> JobHandle | None:
        """The job of a one-slot worker (the first of several otherwise); None when idle."""
        return next(iter(self.jobs.values()), None)

    @job.setter
    def job(self, handle: JobHandle | None) -> None:
        self.jobs.clear()
        if handle is not None:
            self.jobs[handle.job.job_id] = handle

    @property
    def free(self) -> int:
        """Slots without a job."""
        return self.slots - len(self.jobs)
