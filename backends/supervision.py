"""Worker processes of one model: spawn, watch, kill when stalled, replace with backoff, say what happened."""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing as mp
import os
import pickle
import signal
import time
from collections import deque

from backends.jobs import PoolModel, PoolPolicy, WorkerProc
from backends.pipe_io import FrameReader, FrameWriter
from backends.types import ErrorKind, Failed, Tokens
from backends.worker import unpack_tokens, worker_main

log = logging.getLogger("backends.pool")
_SPAWN = mp.get_context("spawn")


def describe_exit(code: int | None) -> str:
    """How a process ended, from its exit code (negative = killed by that signal)."""
    if code is None:
        return "ended (its exit status could not be read)"
    if code >= 0:
        return f"exited with code {code}"
    number = -code
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"was killed by signal {number}"
    return f"was killed by signal {number} ({name})"


_UNREADABLE = object()


def _exit_code(process):
    """The exit code if the process has ended and been reaped now (waitpid WNOHANG: never blocks, needs
    no file descriptor, unlike Process.join, so it works when files run out), else None."""
    try:
        return process.exitcode
    except (ValueError, OSError):  # a closed Process object: its status cannot be read any more
        return _UNREADABLE


def reap_later(process, then, timeout: float = 5.0) -> None:
    """Read an ended process's exit code without blocking the event loop, then call `then(code)`.

    A process's sentinel becomes readable as the process closes its files, a moment before the
    kernel makes its exit status available, so reading `exitcode` at once can give None: this polls
    waitpid from loop timers (1 ms, doubling to 50 ms) and calls `then` at once when the status is
    there already. `code` is None only if the status could not be read within `timeout`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def poll(delay: float) -> None:
        code = _exit_code(process)
        if code is _UNREADABLE:
            then(None)
        elif code is not None or loop.time() >= deadline:
            then(code)
        else:
            loop.call_later(delay, poll, min(delay * 2, 0.05))

    poll(0.001)


async def reaped(process, timeout: float = 5.0) -> int | None:
    """Await an ended (or killed) process's exit code without blocking the loop; no zombie is left."""
    done: asyncio.Future = asyncio.get_running_loop().create_future()
    reap_later(process, lambda code: done.done() or done.set_result(code), timeout)
    return await done


def spawn_retry_delay(failures: int) -> float:
    """Seconds before the next attempt to start a worker after `failures` failed attempts (0.5 s .. 30 s)."""
    return min(0.5 * 2 ** max(failures - 1, 0), 30.0)


def crash_delay(recent_crashes: int) -> float:
    """Seconds before replacing a worker after `recent_crashes` crashes in the window (0.1 s .. 5 s)."""
    return min(0.1 * 2 ** max(recent_crashes - 1, 0), 5.0)


def kill(worker: WorkerProc) -> None:
    """SIGKILL a worker (works on a stopped process too); its exit is handled by the sentinel watcher."""
    try:
        worker.process.kill()
    except (OSError, ValueError, AttributeError):
        pass


class WorkerSupervisor:
    """The process side of a model's pool; the subclass (ModelPool) runs the jobs.

    Hooks the subclass provides: `_on_message(worker, msg)`, `_dispatch()`, `_requeue(handle)`,
    `_fail_pending(message, retry_after)`.
    """

    def __init__(self, spec: PoolModel, policy: PoolPolicy | None, load_timeout: float) -> None:
        self.spec = spec
        self.policy = policy or PoolPolicy()
        self.load_timeout = load_timeout
        self.workers: list[WorkerProc] = []
        self.limits = None
        self.load_error: str | None = None
        self.problem: str | None = None  # why the model is not at full strength right now; None = healthy
        self.restarts = 0
        self.crashes: deque[float] = deque()  # times of recent worker deaths
        self.unavailable_until = 0.0
        self.pieces: tuple[bytes, ...] = ()
        self._closing = False
        self._started = False  # start() succeeded: deaths are replaced from now on
        self._watch: asyncio.TimerHandle | None = None

    # ---- processes ------------------------------------------------------------------------
    def _spawn(self, index: int) -> WorkerProc:
        """Start one worker process and watch its pipe and its exit."""
        progress = _SPAWN.RawValue("L", 0)
        parent, child = _SPAWN.Pipe(duplex=True)
        spec = self.spec
        try:
            if spec.engine == "ggml":
                from backends.batched.process import batched_main  # imports no ggml in this process

                target, args = batched_main, (child, spec.path, spec.slots, spec.threads, spec.chunk, progress,
                                              spec.n_ctx)
            else:
                target, args = worker_main, (child, spec.path, spec.threads, spec.batch_size, spec.flush_interval,
                                             progress)
            proc = _SPAWN.Process(target=target, args=args, name=f"gpt4all-j-worker:{spec.name}:{index}",
                                  daemon=True)
            proc.start()
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        worker = WorkerProc(index=index, process=proc, conn=parent, progress=progress, pid=proc.pid,
                            slots=max(1, spec.slots) if spec.engine == "ggml" else 1)
        os.set_blocking(parent.fileno(), False)  # the loop reads and writes it: whole messages via pipe_io
        worker.reader, worker.writer = FrameReader(parent.fileno()), FrameWriter(parent.fileno())
        loop = asyncio.get_running_loop()
        try:
            loop.add_reader(parent.fileno(), self._readable, worker)
            loop.add_reader(proc.sentinel, self._exited, worker)
        except BaseException:
            self._unwatch(worker)
            kill(worker)
            reap_later(proc, lambda _code: None)
            self._forget(worker)
            raise
        return worker

    async def _kill_all(self) -> None:
        """Kill every worker now (no grace) and reap them: a failed or cancelled start."""
        self._closing = True
        if self._watch is not None:
            self._watch.cancel()
        workers = list(self.workers)
        for w in workers:
            self._unwatch(w)  # their exits are accounted for here
            w.alive = False
            kill(w)
        await asyncio.gather(*(reaped(w.process) for w in workers))
        for w in workers:
            self._forget(w)
            _resolve(w.ready, "the worker was killed")

    def _forget(self, worker: WorkerProc) -> None:
        """Stop watching a worker and close its pipe and timers."""
        self._unwatch(worker)
        if worker.load_timer is not None:
            worker.load_timer.cancel()
        try:
            worker.conn.close()
        except OSError:
            pass

    def _unwatch_conn(self, worker: WorkerProc) -> None:
        if worker.writer is not None:
            worker.writer.close()
        try:
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
        except (ValueError, OSError):
            pass

    def _unwatch(self, worker: WorkerProc) -> None:
        """Stop watching a worker's pipe and sentinel."""
        self._unwatch_conn(worker)
        try:
            asyncio.get_running_loop().remove_reader(worker.process.sentinel)
        except (ValueError, OSError):
            pass

    # ---- events ---------------------------------------------------------------------------
    def _readable(self, worker: WorkerProc) -> None:
        """Drain every complete message a worker has sent."""
        pieces = self.pieces
        try:
            for data in (worker.reader.read() if worker.reader is not None else _drain(worker.conn)):
                tokens = unpack_tokens(data)
                if tokens is not None:
                    job_id, ids = tokens
                    self._on_message(worker, Tokens(job_id, ids, [pieces[t] for t in ids]))
                else:
                    self._on_message(worker, pickle.loads(data))
        except (EOFError, OSError):
            self._unwatch_conn(worker)

    def _on_control(self, worker: WorkerProc, kind: str, payload, report: str | None = None) -> None:
        """A worker's ("ready", limits[, load report]) or ("load_failed", reason)."""
        if kind == "ready":
            if report:
                log.info("worker %d of %s (pid %d) loaded the model: %s", worker.index, self.spec.name,
                         worker.pid, report)
            worker.limits = payload
            self.limits = payload
            _resolve(worker.ready, None)
        elif kind == "load_failed":
            worker.load_error = payload
            _resolve(worker.ready, payload)

    def _exited(self, worker: WorkerProc) -> None:
        """A worker process ended (its sentinel is readable): read its exit status without blocking the
        loop, then account for it (_after_exit)."""
        worker.alive = False  # first, so that draining its last messages cannot hand it a new job
        self._readable(worker)  # e.g. why it could not load, sent just before it exited
        self._unwatch(worker)  # the sentinel stays readable: watch it no more
        reap_later(worker.process, lambda code: self._after_exit(worker, describe_exit(code)))

    def _after_exit(self, worker: WorkerProc, how: str) -> None:
        """Fail a dead worker's job, then replace it (with backoff) unless closing."""
        self._forget(worker)
        _resolve(worker.ready, f"the worker {how} while loading the model")
        handles, worker.jobs = list(worker.jobs.values()), {}
        for handle in handles:
            handle.deliver(Failed(handle.job.job_id, ErrorKind.INTERNAL,
                                  f"the worker process serving this request {how} before it finished"))
        if self._closing or not self._started:
            return  # stop() or start() accounts for it
        if worker.load_error:
            what = f"could not load the model: {worker.load_error}"
        elif worker.killed_because:
            what = f"{how}: {worker.killed_because}"
        else:
            what = how if worker.limits is not None else f"{how} while loading the model"
        self.problem = f"worker {worker.index} {what}"
        delay = self._note_crash()
        log.warning("worker %d of %s (pid %d) %s; starting a replacement in %.2fs", worker.index,
                    self.spec.name, worker.pid, what, delay)
        if not self.available:
            log.error("model %s: %s", self.spec.name, self.problem)
        asyncio.get_running_loop().call_later(delay, self._replace, worker)

    def _note_crash(self) -> float:
        """Record a crash; returns the restart delay. Too many crashes make the model unavailable."""
        now = time.monotonic()
        policy = self.policy
        self.crashes.append(now)
        while self.crashes and self.crashes[0] < now - policy.restart_window:
            self.crashes.popleft()
        if len(self.crashes) < policy.restart_limit:
            return crash_delay(len(self.crashes))
        self.unavailable_until = now + policy.restart_cooldown
        self.crashes.clear()
        self.problem = (f"crashed {policy.restart_limit} times in {policy.restart_window:g}s: unavailable for "
                        f"{policy.restart_cooldown:g}s (last: {self.problem})")
        self._fail_pending(f"its workers crashed {policy.restart_limit} times in {policy.restart_window:g}s",
                           math.ceil(policy.restart_cooldown))
        return policy.restart_cooldown

    def _replace(self, worker: WorkerProc) -> None:
        """Start a new process in a dead worker's slot; a failed start is retried with backoff."""
        if self._closing or worker not in self.workers:
            return
        try:
            replacement = self._spawn(worker.index)
        except Exception as exc:  # e.g. OSError: [Errno 24] Too many open files
            worker.spawn_failures += 1
            delay = spawn_retry_delay(worker.spawn_failures)
            self.problem = f"could not start a replacement for worker {worker.index}: {type(exc).__name__}: {exc}"
            log.error("model %s: %s; retrying in %.1fs (attempt %d failed)", self.spec.name, self.problem,
                      delay, worker.spawn_failures)
            asyncio.get_running_loop().call_later(delay, self._replace, worker)
            return
        self.restarts += 1
        self.workers[self.workers.index(worker)] = replacement
        replacement.load_timer = asyncio.get_running_loop().call_later(
            self.load_timeout, self._load_expired, replacement)
        replacement.ready.add_done_callback(lambda _f: self._loaded(replacement))

    def _loaded(self, worker: WorkerProc) -> None:
        """A replacement finished loading (or failed to: its exit is handled by _exited)."""
        if worker.load_timer is not None:
            worker.load_timer.cancel()
        if worker.limits is not None and worker.alive:
            log.info("worker %d of %s (pid %d) is ready", worker.index, self.spec.name, worker.pid)
            if self.alive == len(self.workers) and self.available:
                self.problem = None
        self._dispatch()

    def _load_expired(self, worker: WorkerProc) -> None:
        """A replacement is still loading after load_timeout: kill it (it is then replaced with backoff)."""
        if worker.ready.done() or not worker.alive:
            return
        worker.killed_because = f"it did not load the model within {self.load_timeout:g}s (load_timeout)"
        log.error("worker %d of %s (pid %d): %s; killing it", worker.index, self.spec.name, worker.pid,
                  worker.killed_because)
        kill(worker)

    # ---- the progress watchdog --------------------------------------------------------------
    def _schedule_watch(self) -> None:
        period = min(1.0, self.policy.stall_timeout / 4)
        self._watch = asyncio.get_running_loop().call_later(period, self._check_progress)

    def _check_progress(self) -> None:
        """Kill busy workers whose progress counter has not moved for stall_timeout seconds (and check again
        later, whatever happens in this check)."""
        if self._closing:
            return
        try:
            self._check_workers()
        finally:
            self._schedule_watch()

    def _check_workers(self) -> None:
        now, limit = time.monotonic(), self.policy.stall_timeout
        for w in list(self.workers):
            if not (w.alive and w.jobs):
                continue
            value = w.progress.value
            if value != w.seen:
                w.seen, w.progress_at = value, now
            elif now - w.progress_at > limit:
                self._readable(w)  # its last messages may not have been handled yet
                if w.alive and w.jobs and w.progress.value == w.seen and now - w.progress_at > limit:
                    self._stalled(w, now - w.progress_at)

    def _stalled(self, worker: WorkerProc, idle: float) -> None:
        """Kill a stalled worker (its exit brings a replacement); each of its jobs fails, or goes back to
        the head of the queue if the worker never even took it."""
        handles, worker.jobs, worker.alive = list(worker.jobs.values()), {}, False
        value = worker.progress.value

        def was_taken(handle) -> bool:
            seen = handle.dispatch_seen if handle.dispatch_seen is not None else worker.dispatch_seen
            return value != seen

        taken = any(was_taken(h) for h in handles)
        worker.killed_because = (f"it made no progress for {idle:.1f}s while {'running' if taken else 'given'} "
                                 f"a job (worker_stall_timeout is {self.policy.stall_timeout:g}s)")
        log.error("worker %d of %s (pid %d): %s; killing it", worker.index, self.spec.name, worker.pid,
                  worker.killed_because)
        kill(worker)
        for handle in reversed(handles):  # requeued ones keep their order at the head of the queue
            if was_taken(handle):
                handle.deliver(Failed(handle.job.job_id, ErrorKind.INTERNAL,
                                      f"the worker serving this request stopped making progress (nothing for "
                                      f"{idle:.0f}s), so it was killed and replaced"))
            else:
                self._requeue(handle)

    # ---- status ---------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """Whether the model takes requests (not closing, not in a crash cooldown)."""
        return not self._closing and time.monotonic() >= self.unavailable_until

    @property
    def busy(self) -> int:
        """Jobs running now (in all workers)."""
        return sum(len(w.jobs) for w in self.workers)

    @property
    def alive(self) -> int:
        """Workers that are loaded and running."""
        return sum(1 for w in self.workers if w.alive and w.limits is not None)


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _drain(conn) -> list[bytes]:
    """Every message waiting on a blocking connection (workers built without pipe_io, e.g. in tests)."""
    out = []
    while conn.poll():
        out.append(conn.recv_bytes())
    return out
