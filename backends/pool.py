"""Worker processes per model: dispatch jobs FIFO, cancel; supervision is in backends.supervision.

ModelPool implements backends.engine_api.Engine (one sequence per worker process, so its slots are its
workers) and WorkerPool implements backends.engine_api.Engines.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque

from backends.engine_api import READY, RESTARTING, UNAVAILABLE, ModelStatus
from backends.ggml.reader import read_vocab
from backends.jobs import (JobGroup, JobHandle, ModelUnavailable, PoolModel, PoolPolicy, QueueFull,
                           WorkerProc, out_of_time, with_time_left)
from backends.supervision import WorkerSupervisor, kill, reaped
from backends.types import ErrorKind, Failed, Finished, FinishReason, GenerationJob, Tokens

log = logging.getLogger(__name__)


class ModelPool(WorkerSupervisor):
    """The workers of one model and its bounded FIFO queue."""

    def __init__(self, spec: PoolModel, policy: PoolPolicy | None = None, load_timeout: float = 120.0) -> None:
        super().__init__(spec, policy, load_timeout)
        self.pending: deque[JobHandle] = deque()
        # token id -> bytes, to decode the workers' token messages (the registry already read it)
        self.pieces = spec.pieces or tuple(read_vocab(spec.path))
        self._ids = itertools.count(1)

    # ---- the engine interface (backends.engine_api.Engine) ------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def prefix_cache(self) -> bool:
        return self.spec.prefix_cache

    def status(self) -> ModelStatus:
        """A snapshot: each worker process has spec.slots slots; the queue holds up to max_queue more jobs."""
        available, alive = self.available, self.alive
        state = UNAVAILABLE if not available else RESTARTING if alive == 0 else READY
        return ModelStatus(name=self.spec.name, state=state, available=available,
                           slots=self.spec.workers * self._slots,
                           running=self.busy, queued=len(self.pending), queue_capacity=self.spec.max_queue,
                           processes=self.spec.workers, alive=alive, restarts=self.restarts,
                           problem=self.problem, pids=tuple(w.process.pid for w in self.workers if w.alive))

    @property
    def _slots(self) -> int:
        """Jobs one worker process runs at once."""
        return max(1, self.spec.slots) if self.spec.engine == "ggml" else 1

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self, timeout: float | None = None) -> bool:
        """Spawn the workers and wait until they have loaded the model; False if it failed.

        Cancelling it (a shutdown during a slow load) kills the spawned workers at once and re-raises.
        """
        if timeout is not None:
            self.load_timeout = timeout
        try:
            for i in range(self.spec.workers):
                self.workers.append(self._spawn(i))
            ready = asyncio.gather(*(w.ready for w in self.workers))
            ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "never retrieved"
            done = await asyncio.wait_for(ready, self.load_timeout)
        except asyncio.CancelledError:
            await self._kill_all()
            raise
        except TimeoutError:
            return await self._start_failed(f"its workers did not load the model within {self.load_timeout:g}s "
                                            "(load_timeout)")
        except Exception as exc:  # e.g. OSError: too many open files
            return await self._start_failed(f"could not start a worker: {type(exc).__name__}: {exc}")
        failures = [msg for msg in done if msg]
        if failures:
            return await self._start_failed(failures[0])
        self._started = True
        self._schedule_watch()
        return True

    async def _start_failed(self, reason: str) -> bool:
        self.load_error = self.problem = reason
        await self._kill_all()
        return False

    async def stop(self, grace: float = 5.0) -> None:
        """Stop every worker: ask politely, then terminate, then kill; reap them all. Never blocks the
        event loop (every wait is a timer); safe to call more than once."""
        self._closing = True
        if self._watch is not None:
            self._watch.cancel()
        self._fail_pending("the server is shutting down")
        for w in self.workers:
            self._send(w, ("exit", None))
        await self._wait_ended(self.workers, grace)
        left = [w for w in self.workers if _running(w)]
        for w in left:
            try:
                w.process.terminate()
            except (OSError, ValueError, AttributeError):
                pass
        await self._wait_ended(left, 1.0)
        for w in left:
            if _running(w):
                kill(w)
        await asyncio.gather(*(reaped(w.process) for w in left))
        for w in self.workers:
            self._forget(w)

    @staticmethod
    async def _wait_ended(workers: list[WorkerProc], timeout: float) -> None:
        """Wait (on timers) until every one of these workers has exited, or the timeout."""
        deadline = time.monotonic() + timeout
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    # ---- events from workers ----------------------------------------------------------------
    def _on_message(self, worker: WorkerProc, msg) -> None:
        """Route one message from a worker."""
        if isinstance(msg, tuple):
            self._on_control(worker, *msg)
            return
        handle = worker.jobs.get(msg.job_id)
        if handle is None:
            return  # late event of a job already given up on
        handle.deliver(msg)
        if isinstance(msg, Tokens):
            if worker.slots == 1:
                worker.cached.extend(msg.ids)
        elif isinstance(msg, Failed):
            worker.cached = []
            if msg.kind == ErrorKind.INTERNAL:
                log.error("model %s: a job failed in worker %d (pid %d): %s", self.spec.name, worker.index,
                          worker.pid, msg.message)
        if isinstance(msg, (Finished, Failed)):
            del worker.jobs[msg.job_id]
            self._dispatch()

    def _fail_pending(self, message: str, retry_after: int | None = None) -> None:
        """Fail every queued job as unavailable (shutdown, crash cooldown)."""
        for handle in list(self.pending):
            self._unqueue(handle)
            handle.deliver(Failed(handle.job.job_id, ErrorKind.UNAVAILABLE, message, retry_after))

    def _requeue(self, handle: JobHandle) -> None:
        """Put a job that its worker never took back at the head of the queue (no timeout: it was served)."""
        handle.worker, handle.dispatched_at = None, None
        if handle.cancel_sent:
            handle.deliver(Finished(handle.job.job_id, FinishReason.CANCELLED, 0))
            return
        self.pending.appendleft(handle)
        self._dispatch()

    # ---- jobs ------------------------------------------------------------------------------
    def new_job_id(self) -> int:
        """A job id unique within this model."""
        return next(self._ids)

    def submit(self, job: GenerationJob, sink: asyncio.Queue | None = None, tag: int = 0,
               group: JobGroup | None = None) -> JobHandle:
        """Queue a job (FIFO) and start it when a worker is idle; events go to sink as (tag, event).

        Jobs of one request share a group: once one of them has reached a worker, the others no
        longer expire in the queue, and their time limit is what is left of the request's.
        """
        if not self.available:
            raise self._unavailable()
        if len(self.pending) >= self.spec.max_queue and self._idle() is None:
            raise QueueFull(f"the queue of model {self.spec.name} is full")
        handle = JobHandle(job, self, sink, tag, group)
        self.pending.append(handle)
        if self.policy.queue_timeout > 0 and not (group is not None and group.started):
            loop = asyncio.get_running_loop()
            handle.timer = loop.call_later(self.policy.queue_timeout, self._expire, handle)
        self._dispatch()
        return handle

    def _unavailable(self) -> ModelUnavailable:
        if self._closing:
            return ModelUnavailable(f"model {self.spec.name} is unavailable: the server is shutting down")
        left = max(1, math.ceil(self.unavailable_until - time.monotonic()))
        return ModelUnavailable(f"model {self.spec.name} is unavailable for {left}s more after repeated worker "
                                "crashes", retry_after=left)

    def _expire(self, handle: JobHandle) -> None:
        """A job waited too long in the queue (unless its request has already started)."""
        if handle in self.pending and not (handle.group is not None and handle.group.started):
            self._unqueue(handle)
            handle.deliver(Failed(handle.job.job_id, ErrorKind.QUEUE_TIMEOUT,
                                  f"the request waited {self.policy.queue_timeout:g}s for a worker of "
                                  f"model {self.spec.name}"))

    def _unqueue(self, handle: JobHandle) -> None:
        self.pending.remove(handle)
        if handle.timer is not None:
            handle.timer.cancel()

    def _idle(self, prompt: list[int] | None = None) -> WorkerProc | None:
        """A worker with a free slot; with a prompt, the one whose cache shares the longest prefix with it
        (one-slot workers; a multi-slot one reuses prefixes by itself: the least loaded wins)."""
        best, best_key = None, None
        for w in self.workers:
            if not (w.alive and w.free > 0 and w.limits is not None):
                continue
            if w.slots > 1:
                if best is None or w.free > best.free:
                    best = w
                continue
            if prompt is None or not self.spec.prefix_cache:
                return w
            key = (_common_prefix(w.cached, prompt), -w.last_used)
            if best_key is None or key > best_key:
                best, best_key = w, key
        return best

    def _dispatch(self) -> None:
        """Hand queued jobs to idle workers in arrival order."""
        while self.pending:
            head = self.pending[0]
            if out_of_time(head.group):
                self._unqueue(head)
                head.finish_unstarted()
                continue
            prompt = head.job.prompt
            worker = self._idle(prompt if isinstance(prompt, list) else None)
            if worker is None:
                return
            handle = self.pending.popleft()
            if handle.timer is not None:
                handle.timer.cancel()
            now = handle.dispatched_at = time.monotonic()
            idle = not worker.jobs
            worker.jobs[handle.job.job_id] = handle
            if worker.slots == 1:
                worker.cached = list(prompt) if isinstance(prompt, list) else []
            worker.last_used = now
            handle.dispatch_seen = worker.progress.value
            if idle:  # a busy worker's watchdog clock keeps running
                worker.seen = worker.dispatch_seen = worker.progress.value
                worker.progress_at = now
            handle.worker = worker
            self._send(worker, ("job", with_time_left(handle.job, handle.group, now)))

    def cancel(self, handle: JobHandle) -> None:
        """Drop a queued job, or ask its worker to stop between tokens."""
        if handle in self.pending:
            self._unqueue(handle)
            handle.deliver(Finished(handle.job.job_id, FinishReason.CANCELLED, 0))
            return
        worker = handle.worker
        if worker is not None and worker.jobs.get(handle.job.job_id) is handle and not handle.cancel_sent:
            handle.cancel_sent = True
            self._send(worker, ("cancel", handle.job.job_id))

    def _send(self, worker: WorkerProc, msg) -> None:
        if worker.writer is not None:  # whole messages, in order, even when the pipe is full (pipe_io)
            worker.writer.send(msg)
            return
        try:
            worker.conn.send(msg)
        except (BrokenPipeError, OSError):
            pass  # its exit is handled by the sentinel watcher


def _running(worker: WorkerProc) -> bool:
    """The worker's process has not ended (is_alive reaps it with waitpid WNOHANG: never blocks)."""
    try:
        return worker.process.is_alive()
    except (ValueError, AssertionError):  # closed, or not our child
        return False


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


__all__ = ["JobGroup", "JobHandle", "ModelPool", "ModelUnavailable", "PoolModel", "PoolPolicy", "QueueFull"]
