"""Worker processes per model: spawn, supervise, dispatch jobs FIFO, cancel, restart."""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import pickle
import time
from collections import deque

from backends.jobs import JobHandle, ModelUnavailable, PoolModel, PoolPolicy, QueueFull, WorkerProc
from backends.types import ErrorKind, Failed, Finished, FinishReason, GenerationJob, Tokens
from backends.ggml.reader import read_vocab
from backends.worker import unpack_tokens, worker_main

log = logging.getLogger(__name__)
_SPAWN = mp.get_context("spawn")


class ModelPool:
    """The workers of one model and its bounded FIFO queue."""

    def __init__(self, spec: PoolModel, policy: PoolPolicy | None = None) -> None:
        self.spec = spec
        self.policy = policy or PoolPolicy()
        self.workers: list[WorkerProc] = []
        self.pending: deque[JobHandle] = deque()
        self.limits = None
        self.load_error: str | None = None
        self.restarts = 0
        self.crashes: deque[float] = deque()  # times of recent worker deaths
        self.unavailable_until = 0.0
        # token id -> bytes, to decode the workers' token messages (the registry already read it)
        self.pieces = spec.pieces or tuple(read_vocab(spec.path))
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
            args=(child, self.spec.path, self.spec.threads, self.spec.batch_size, self.spec.flush_interval),
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
        self._fail_pending("the server is shutting down")
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
        conn, pieces = worker.conn, self.pieces
        try:
            while conn.poll():
                data = conn.recv_bytes()
                tokens = unpack_tokens(data)
                if tokens is not None:
                    job_id, ids = tokens
                    self._on_message(worker, Tokens(job_id, ids, [pieces[t] for t in ids]))
                else:
                    self._on_message(worker, pickle.loads(data))
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
        if isinstance(msg, Tokens):
            worker.cached.extend(msg.ids)
        elif isinstance(msg, Failed):
            worker.cached = []
        if isinstance(msg, (Finished, Failed)):
            worker.job = None
            self._dispatch()

    def _exited(self, worker: WorkerProc) -> None:
        """A worker process ended: fail its job, then replace it (with backoff) unless closing."""
        self._unwatch(worker)
        worker.alive = False
        code = worker.process.exitcode
        worker.process.join(0)  # reap it: no zombie
        _resolve(worker.ready, f"the worker exited with code {code} while loading")
        if worker.job is not None:
            worker.job.deliver(Failed(worker.job.job.job_id, ErrorKind.INTERNAL,
                                      f"the worker serving this request died (exit code {code})"))
            worker.job = None
        if self._closing:
            return
        delay = self._note_crash()
        log.warning("worker %s of %s died (exit code %s); replacing it in %.2fs",
                    worker.index, self.spec.name, code, delay)
        asyncio.get_running_loop().call_later(delay, self._replace, worker)

    def _note_crash(self) -> float:
        """Record a crash; returns the restart delay. Too many crashes make the model unavailable."""
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes and self.crashes[0] < now - self.policy.restart_window:
            self.crashes.popleft()
        if len(self.crashes) >= self.policy.restart_limit:
            self.unavailable_until = now + self.policy.restart_cooldown
            self.crashes.clear()
            log.error("model %s crashed %d times in %.0fs: unavailable for %.0fs", self.spec.name,
                      self.policy.restart_limit, self.policy.restart_window, self.policy.restart_cooldown)
            self._fail_pending("the model is unavailable after repeated worker crashes")
            return self.policy.restart_cooldown
        return min(0.1 * 2 ** (len(self.crashes) - 1), 5.0)

    def _replace(self, worker: WorkerProc) -> None:
        """Start a new process in a dead worker's slot."""
        if self._closing or worker not in self.workers:
            return
        self.restarts += 1
        replacement = self._spawn(worker.index)
        self.workers[self.workers.index(worker)] = replacement
        replacement.ready.add_done_callback(lambda _f: self._dispatch())

    def _fail_pending(self, message: str) -> None:
        for handle in list(self.pending):
            self._unqueue(handle)
            handle.deliver(Failed(handle.job.job_id, ErrorKind.UNAVAILABLE, message))

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
        if not self.available:
            raise ModelUnavailable(f"model {self.spec.name} is unavailable (its workers keep crashing "
                                   "or the server is shutting down)")
        if len(self.pending) >= self.spec.max_queue and self._idle() is None:
            raise QueueFull(f"the queue of model {self.spec.name} is full")
        handle = JobHandle(job, self, sink, tag)
        self.pending.append(handle)
        if self.policy.queue_timeout > 0:
            loop = asyncio.get_running_loop()
            handle.timer = loop.call_later(self.policy.queue_timeout, self._expire, handle)
        self._dispatch()
        return handle

    def _expire(self, handle: JobHandle) -> None:
        """A job waited too long in the queue."""
        if handle in self.pending:
            self._unqueue(handle)
            handle.deliver(Failed(handle.job.job_id, ErrorKind.QUEUE_TIMEOUT,
                                  f"the request waited {self.policy.queue_timeout:g}s for a worker of "
                                  f"model {self.spec.name}"))

    def _unqueue(self, handle: JobHandle) -> None:
        self.pending.remove(handle)
        if handle.timer is not None:
            handle.timer.cancel()

    @property
    def available(self) -> bool:
        """Whether the model takes requests (not closing, not in a crash cooldown)."""
        return not self._closing and time.monotonic() >= self.unavailable_until

    def _idle(self, prompt: list[int] | None = None) -> WorkerProc | None:
        """An idle worker; with a prompt, the one whose cache shares the longest prefix with it."""
        best, best_key = None, None
        for w in self.workers:
            if not (w.alive and w.job is None and w.limits is not None):
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
            prompt = self.pending[0].job.prompt
            worker = self._idle(prompt if isinstance(prompt, list) else None)
            if worker is None:
                return
            handle = self.pending.popleft()
            if handle.timer is not None:
                handle.timer.cancel()
            handle.dispatched_at = time.monotonic()
            worker.job = handle
            worker.cached = list(prompt) if isinstance(prompt, list) else []
            worker.last_used = handle.dispatched_at
            handle.worker = worker
            self._send(worker, ("job", handle.job))

    def cancel(self, handle: JobHandle) -> None:
        """Drop a queued job, or ask its worker to stop between tokens."""
        if handle in self.pending:
            self._unqueue(handle)
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


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


class WorkerPool:
    """All served models, each with its own workers and queue."""

    def __init__(self, specs: list[PoolModel], load_timeout: float = 120.0,
                 policy: PoolPolicy | None = None) -> None:
        self.specs = specs
        self.load_timeout = load_timeout
        self.policy = policy or PoolPolicy()
        self.models: dict[str, ModelPool] = {}
        self.failed: dict[str, str] = {}

    async def start(self) -> None:
        """Start every model's workers concurrently; remember the ones that failed to load."""
        pools = [ModelPool(spec, self.policy) for spec in self.specs]
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


__all__ = ["JobHandle", "ModelPool", "ModelUnavailable", "PoolModel", "PoolPolicy", "QueueFull", "WorkerPool"]
