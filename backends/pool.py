"""Worker processes per model: spawn, supervise, dispatch jobs FIFO, cancel, restart."""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import time
from collections import deque
from dataclasses import dataclass, field

from backends.types import (
    ErrorKind,
    Event,
    Failed,
    Finished,
    FinishReason,
    GenerationJob,
    ModelLimits,
    SamplingParams,
)
from backends.worker import worker_main

log = logging.getLogger(__name__)
_SPAWN = mp.get_context("spawn")


class QueueFull(Exception):
    """The model's wait queue is full; the client should retry later."""


class ModelUnavailable(Exception):
    """The model has no live workers."""


@dataclass(frozen=True)
class PoolModel:
    """What the pool needs to know to serve one model."""

    name: str
    path: str
    workers: int = 1
    threads: int = 1
    batch_size: int = 8
    max_queue: int = 64


class JobHandle:
    """A submitted job: an async stream of engine events, cancellable at any time."""

    def __init__(self, job: GenerationJob, pool: "ModelPool", sink: asyncio.Queue | None = None,
                 tag: int = 0) -> None:
        self.job = job
        self._pool = pool
        self._events: asyncio.Queue = sink if sink is not None else asyncio.Queue()
        self.tag = tag
        self.worker: "WorkerProc | None" = None
        self.done = False
        self.cancel_sent = False

    def deliver(self, event: Event) -> None:
        """Called by the pool with each event for this job."""
        if isinstance(event, (Finished, Failed)):
            self.done = True
        self._events.put_nowait((self.tag, event))

    async def events(self):
        """Yield events until the job finishes or fails (when no shared sink was given)."""
        while True:
            _tag, event = await self._events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    def cancel(self) -> None:
        """Stop the job: drop it from the queue or stop its worker between tokens."""
        if not self.done:
            self._pool.cancel(self)


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


class ModelPool:
    """The workers of one model and its bounded FIFO queue."""

    def __init__(self, spec: PoolModel) -> None:
        self.spec = spec
        self.workers: list[WorkerProc] = []
        self.pending: deque[JobHandle] = deque()
        self.limits: ModelLimits | None = None
        self.load_error: str | None = None
        self.restarts = 0
        self._closing = False
        self._ids = itertools.count(1)

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self, timeout: float) -> bool:
        """Spawn the workers and wait until they have loaded the model; False if it failed."""
        self.workers = [self._spawn(i) for i in range(self.spec.workers)]
        done = await asyncio.wait_for(asyncio.gather(*(w.ready for w in self.workers)), timeout)
        failures = [msg for msg in done if msg]
        if failures:
            self.load_error = failures[0]
            await self.stop()
            return False
        return True

    def _spawn(self, index: int) -> WorkerProc:
        """Start one worker process and watch its pipe and its exit."""
        parent, child = _SPAWN.Pipe(duplex=True)
        proc = _SPAWN.Process(
            target=worker_main,
            args=(child, self.spec.path, self.spec.threads, self.spec.batch_size),
            name=f"gpt4all-j-worker:{self.spec.name}:{index}",
            daemon=True,
        )
        proc.start()
        child.close()
        worker = WorkerProc(index=index, process=proc, conn=parent)
        loop = asyncio.get_running_loop()
        loop.add_reader(parent.fileno(), self._readable, worker)
        loop.add_reader(proc.sentinel, self._exited, worker)
        return worker

    async def stop(self, grace: float = 5.0) -> None:
        """Stop every worker: ask politely, then terminate, then kill; reap them all."""
        self._closing = True
        for handle in list(self.pending):
            handle.deliver(Failed(handle.job.job_id, ErrorKind.INTERNAL, "the server is shutting down"))
        self.pending.clear()
        for w in self.workers:
            self._send(w, ("exit", None))
        deadline = time.monotonic() + grace
        for w in self.workers:
            while w.process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(1.0)
            if w.process.is_alive():
                w.process.kill()
            w.process.join(1.0)
            self._unwatch(w)

    # ---- events from workers ----------------------------------------------------------------
    def _readable(self, worker: WorkerProc) -> None:
        """Drain every complete message a worker has sent."""
        try:
            while worker.conn.poll():
                self._on_message(worker, worker.conn.recv())
        except (EOFError, OSError):
            self._unwatch_conn(worker)

    def _on_message(self, worker: WorkerProc, msg) -> None:
        """Route one message from a worker."""
        if isinstance(msg, tuple):
            kind, payload = msg
            if kind == "ready":
                worker.limits = payload
                self.limits = payload
                _resolve(worker.ready, None)
            elif kind == "load_failed":
                _resolve(worker.ready, payload)
            return
        handle = worker.job
        if handle is None or handle.job.job_id != msg.job_id:
            return  # late event of a job already given up on
        handle.deliver(msg)
        if isinstance(msg, (Finished, Failed)):
            worker.job = None
            self._dispatch()

    def _exited(self, worker: WorkerProc) -> None:
        """A worker process ended: fail its job, replace it unless we are closing."""
        self._unwatch(worker)
        worker.alive = False
        code = worker.process.exitcode
        _resolve(worker.ready, f"the worker exited with code {code} while loading")
        if worker.job is not None:
            worker.job.deliver(Failed(worker.job.job.job_id, ErrorKind.INTERNAL,
                                      f"the worker serving this request died (exit code {code})"))
            worker.job = None
        if self._closing or worker.limits is None:
            return
        log.warning("worker %s of %s died (exit code %s); starting a replacement",
                    worker.index, self.spec.name, code)
        self.restarts += 1
        replacement = self._spawn(worker.index)
        self.workers[self.workers.index(worker)] = replacement
        replacement.ready.add_done_callback(lambda _f: self._dispatch())

    def _unwatch_conn(self, worker: WorkerProc) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.remove_reader(worker.conn.fileno())
        except (ValueError, OSError):
            pass

    def _unwatch(self, worker: WorkerProc) -> None:
        """Stop watching a worker's pipe and sentinel."""
        loop = asyncio.get_running_loop()
        self._unwatch_conn(worker)
        try:
            loop.remove_reader(worker.process.sentinel)
        except (ValueError, OSError):
            pass

    # ---- jobs ------------------------------------------------------------------------------
    def new_job_id(self) -> int:
        """A job id unique within this model."""
        return next(self._ids)

    def submit(self, job: GenerationJob, sink: asyncio.Queue | None = None, tag: int = 0) -> JobHandle:
        """Queue a job (FIFO) and start it when a worker is idle; events go to sink as (tag, event)."""
        if self._closing or not any(w.alive for w in self.workers):
            raise ModelUnavailable(f"model {self.spec.name} has no running workers")
        if len(self.pending) >= self.spec.max_queue and self._idle() is None:
            raise QueueFull(f"the queue of model {self.spec.name} is full")
        handle = JobHandle(job, self, sink, tag)
        self.pending.append(handle)
        self._dispatch()
        return handle

    def _idle(self) -> WorkerProc | None:
        for w in self.workers:
            if w.alive and w.job is None and w.limits is not None:
                return w
        return None

    def _dispatch(self) -> None:
        """Hand queued jobs to idle workers in arrival order."""
        while self.pending:
            worker = self._idle()
            if worker is None:
                return
            handle = self.pending.popleft()
            worker.job = handle
            handle.worker = worker
            self._send(worker, ("job", handle.job))

    def cancel(self, handle: JobHandle) -> None:
        """Drop a queued job, or ask its worker to stop between tokens."""
        if handle in self.pending:
            self.pending.remove(handle)
            handle.deliver(Finished(handle.job.job_id, FinishReason.CANCELLED, 0))
            return
        worker = handle.worker
        if worker is not None and worker.job is handle and not handle.cancel_sent:
            handle.cancel_sent = True
            self._send(worker, ("cancel", handle.job.job_id))

    def _send(self, worker: WorkerProc, msg) -> None:
        try:
            worker.conn.send(msg)
        except (BrokenPipeError, OSError):
            pass  # its exit is handled by the sentinel watcher

    # ---- status ----------------------------------------------------------------------------
    @property
    def busy(self) -> int:
        """Workers currently running a job."""
        return sum(1 for w in self.workers if w.job is not None)

    @property
    def alive(self) -> int:
        """Workers that are loaded and running."""
        return sum(1 for w in self.workers if w.alive and w.limits is not None)


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


class WorkerPool:
    """All served models, each with its own workers and queue."""

    def __init__(self, specs: list[PoolModel], load_timeout: float = 120.0) -> None:
        self.specs = specs
        self.load_timeout = load_timeout
        self.models: dict[str, ModelPool] = {}
        self.failed: dict[str, str] = {}

    async def start(self) -> None:
        """Start every model's workers concurrently; remember the ones that failed to load."""
        pools = [ModelPool(spec) for spec in self.specs]
        results = await asyncio.gather(
            *(p.start(self.load_timeout) for p in pools), return_exceptions=True
        )
        for pool, ok in zip(pools, results):
            if ok is True:
                self.models[pool.spec.name] = pool
            else:
                reason = pool.load_error or f"{type(ok).__name__}: {ok}"
                self.failed[pool.spec.name] = reason
                log.error("model %s could not be loaded: %s", pool.spec.name, reason)
                await pool.stop(grace=0.5)

    async def stop(self) -> None:
        """Stop all workers of all models."""
        await asyncio.gather(*(p.stop() for p in self.models.values()))

    def get(self, name: str) -> ModelPool | None:
        """The pool serving a model, if it is loaded."""
        return self.models.get(name)


__all__ = [
    "JobHandle", "ModelPool", "ModelUnavailable", "PoolModel", "QueueFull", "SamplingParams",
    "WorkerPool",
]
