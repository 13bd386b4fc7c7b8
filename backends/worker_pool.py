"""Every served model's pool: start them all, retry the ones that fail to start, stop them all, snapshot them."""

from __future__ import annotations

import asyncio
import logging
import math
import time

from backends.engine_api import FAILED, LOADING, ModelStatus
from backends.jobs import PoolModel, PoolPolicy
from backends.pool import ModelPool
from backends.supervision import spawn_retry_delay

log = logging.getLogger("backends.pool")


class WorkerPool:
    """All served models, each with its own workers and queue.

    A model that cannot be started (a spawn error such as too many open files, a load timeout on a
    busy machine, a file that cannot be read yet) is in `failed` with the reason, and its start is
    retried after 0.5, 1, 2 ... up to 30 s, for as long as the server runs; once an attempt
    succeeds it serves (`get` returns it) and leaves `failed`.
    """

    def __init__(self, specs: list[PoolModel], load_timeout: float = 120.0,
                 policy: PoolPolicy | None = None) -> None:
        self.specs = specs
        self.load_timeout = load_timeout
        self.policy = policy or PoolPolicy()
        # both are replaced, not changed in place, so that a reader iterating one is never disturbed
        self.models: dict[str, ModelPool] = {}  # the serving pools
        self.failed: dict[str, str] = {}  # model -> why its last start attempt failed (retries go on)
        self._pools: list[ModelPool] = []  # every pool created and not yet stopped: stop() stops them all
        self._retries: dict[str, asyncio.Task] = {}
        self._next_attempt: dict[str, float] = {}  # model -> monotonic time of its next start attempt
        self._logged: dict[str, set[str]] = {}  # model -> failure reasons already logged (one line each)
        self._closing = False

    async def start(self) -> None:
        """Start every model's workers concurrently; the ones that fail are retried in the background.

        Cancelling it kills every worker spawned so far at once, including those of models that had
        already loaded, and re-raises.
        """
        try:
            results = await asyncio.gather(*(self._attempt(spec) for spec in self.specs))
        except asyncio.CancelledError:
            await self._kill_all()
            raise
        for spec, (pool, reason) in zip(self.specs, results):
            if self._closing:
                break  # stop() came meanwhile: it stops every listed pool
            if pool is not None:
                self._serve(pool)
            else:
                self._retry(spec, reason, 1)

    async def _attempt(self, spec: PoolModel) -> tuple[ModelPool | None, str | None]:
        """One attempt to start a model: its pool, or None and why not (its workers are gone then)."""
        try:
            pool = ModelPool(spec, self.policy, self.load_timeout)
        except Exception as exc:  # e.g. OSError: too many open files, reading the vocabulary
            return None, f"could not start it: {type(exc).__name__}: {exc}"
        if self._closing:
            return None, "the server is shutting down"
        self._pools.append(pool)
        try:
            ok = await pool.start()
        except asyncio.CancelledError:
            raise  # start() killed its workers; the pool stays listed for stop()
        except Exception as exc:
            pool.load_error, ok = pool.load_error or f"{type(exc).__name__}: {exc}", False
        if ok and self._closing:  # stop() ran meanwhile and did not see this pool
            await pool.stop(grace=0.5)
            return None, "the server is shutting down"
        if ok:
            return pool, None
        await pool.stop(grace=0.5)
        if pool in self._pools:
            self._pools.remove(pool)
        return None, pool.load_error or "its workers could not load the model"

    def _serve(self, pool: ModelPool) -> None:
        name = pool.spec.name
        self.models = {**self.models, name: pool}
        self.failed = {k: v for k, v in self.failed.items() if k != name}
        self._next_attempt.pop(name, None)
        self._logged.pop(name, None)

    def _retry(self, spec: PoolModel, reason: str, failures: int) -> None:
        """Record a failed start (`failures` in a row) and schedule the next attempt."""
        name = spec.name
        if self._closing:
            return
        delay = spawn_retry_delay(failures)
        self.failed = {**self.failed, name: reason}
        self._next_attempt[name] = time.monotonic() + delay
        logged = self._logged.setdefault(name, set())
        if reason not in logged:  # one line per distinct reason, not one per attempt (every 30 s, forever)
            logged.add(reason)
            log.error("model %s could not be loaded: %s; retrying in %.1fs, then with growing delays up to 30s "
                      "(attempt %d failed; this reason is logged once)", name, reason, delay, failures)
        else:
            log.debug("model %s could not be loaded (attempt %d): %s; retrying in %.1fs", name, failures,
                      reason, delay)
        self._retries[name] = asyncio.get_running_loop().create_task(self._retry_after(spec, failures, delay),
                                                                     name=f"start {name}")

    async def _retry_after(self, spec: PoolModel, failures: int, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._closing:
            return
        pool, reason = await self._attempt(spec)
        if self._closing:
            return  # stop() stops the pool (it is in _pools)
        if pool is not None:
            self._retries.pop(spec.name, None)
            self._serve(pool)
            log.info("model %s is serving after %d failed attempt(s) to start it", spec.name, failures)
        else:
            self._retry(spec, reason, failures + 1)

    def status(self) -> dict[str, ModelStatus]:
        """A snapshot of every model, in registry order: a serving one's own (ModelPool.status), else one
        in `failed` (with the reason and when it is retried) or `loading`."""
        models, failed, out = self.models, self.failed, {}
        for spec in self.specs:
            name = spec.name
            pool = models.get(name)
            if pool is not None:
                out[name] = pool.status()
                continue
            state = FAILED if name in failed else LOADING
            out[name] = ModelStatus(name=name, state=state, available=False, slots=spec.workers, running=0,
                                    queued=0, queue_capacity=spec.max_queue, processes=spec.workers, alive=0,
                                    restarts=0, problem=failed[name] if name in failed else "not loaded yet",
                                    retry_in=self.retry_in(name))
        return out

    def retry_in(self, name: str) -> int | None:
        """Whole seconds (at least 1) until the next attempt to start a model that failed to start, for
        Retry-After; None if the model is not in `failed`. 1 while an attempt is under way."""
        at = self._next_attempt.get(name)
        if name not in self.failed or at is None:
            return None
        return max(1, math.ceil(at - time.monotonic()))

    async def _kill_all(self) -> None:
        """A cancelled start: kill every worker of every pool now, no grace."""
        await asyncio.gather(*(p._kill_all() for p in self._pools), return_exceptions=True)

    async def stop(self) -> None:
        """Stop the retries and all workers of all models (serving, loading or being retried)."""
        self._closing = True
        retries = list(self._retries.values())
        for task in retries:
            task.cancel()
        await asyncio.gather(*retries, return_exceptions=True)
        self._retries.clear()
        pools, self._pools = list(self._pools), []
        await asyncio.gather(*(p.stop() for p in pools))

    def get(self, name: str) -> ModelPool | None:
        """The pool serving a model, if it is loaded."""
        return self.models.get(name)
