"""The engine seam (backends.engine_api): the pool's status snapshot, and what the server reads from it
(admission, /ready, /metrics), against the real pool's bookkeeping and a small in-process fake engine."""

from __future__ import annotations

import ast
import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from backends.engine_api import (FAILED, LOADING, READY, RESTARTING, UNAVAILABLE, Engine, Engines, JobGroup,
                                 JobTicket, ModelStatus, ModelUnavailable, QueueFull)
from backends.jobs import JobHandle, WorkerProc
from backends.pool import ModelPool, PoolModel
from backends.worker_pool import WorkerPool
from backends.types import (Failed, Finished, FinishReason, GenerationJob, ModelLimits, SamplingParams, Started,
                            Tokens)
from server.errors import APIError
from server.metrics import Metrics
from server.params import Plan
from server.routes.health import model_states
from server.runner import Run

LIMITS = ModelLimits(n_ctx=64, n_vocab=4, eos_token_id=0)


# ---- a small in-process engine: `slots` sequences at once, then a FIFO queue of `queue_capacity` ----

class FakeTicket:
    def __init__(self, engine: FakeEngine, job: GenerationJob, sink: asyncio.Queue, tag: int) -> None:
        self.engine, self.job, self.sink, self.tag = engine, job, sink, tag
        self.done = False
        self.queue_wait: float | None = None

    def deliver(self, event) -> None:
        if isinstance(event, (Finished, Failed)):
            self.done = True
        self.sink.put_nowait((self.tag, event))

    def cancel(self) -> None:
        if not self.done:
            self.engine.cancel(self)


class FakeEngine:
    """Runs nothing: a job starts when a slot is free and ends when the test says so."""

    def __init__(self, name: str = "fake", slots: int = 8, queue_capacity: int = 0, prefix_cache: bool = False,
                 available: bool = True) -> None:
        self.name, self.slots, self.queue_capacity = name, slots, queue_capacity
        self.prefix_cache, self.available = prefix_cache, available
        self.limits, self.pieces = LIMITS, (b"", b"a", b"b", b"c")
        self.running: list[FakeTicket] = []
        self.queue: list[FakeTicket] = []
        self.submitted: list[GenerationJob] = []
        self._next = 0

    def new_job_id(self) -> int:
        self._next += 1
        return self._next

    def submit(self, job, sink=None, tag=0, group: JobGroup | None = None) -> FakeTicket:
        if not self.available:
            raise ModelUnavailable(f"model {self.name} is unavailable for 7s more", retry_after=7)
        if len(self.running) >= self.slots and len(self.queue) >= self.queue_capacity:
            raise QueueFull(f"the queue of model {self.name} is full")
        ticket = FakeTicket(self, job, sink if sink is not None else asyncio.Queue(), tag)
        self.submitted.append(job)
        self.queue.append(ticket)
        self._admit()
        return ticket

    def _admit(self) -> None:
        while self.queue and len(self.running) < self.slots:
            ticket = self.queue.pop(0)
            ticket.queue_wait = 0.0
            self.running.append(ticket)
            ticket.deliver(Started(ticket.job.job_id, len(ticket.job.prompt)))

    def finish(self, ticket: FakeTicket, ids: list[int]) -> None:
        ticket.deliver(Tokens(ticket.job.job_id, ids, [self.pieces[i] for i in ids]))
        ticket.deliver(Finished(ticket.job.job_id, FinishReason.LENGTH, len(ids)))
        self.running.remove(ticket)
        self._admit()

    def cancel(self, ticket: FakeTicket) -> None:
        if ticket in self.queue:
            self.queue.remove(ticket)
        elif ticket in self.running:
            self.running.remove(ticket)
        else:
            return
        ticket.deliver(Finished(ticket.job.job_id, FinishReason.CANCELLED, 0))
        self._admit()

    def status(self) -> ModelStatus:
        return ModelStatus(name=self.name, state=READY if self.available else UNAVAILABLE,
                           available=self.available, slots=self.slots, running=len(self.running),
                           queued=len(self.queue), queue_capacity=self.queue_capacity, processes=1, alive=1,
                           restarts=0, problem=None, pids=(1234,))


def _plan(prompts: int = 1, n: int = 1) -> Plan:
    return Plan(prompts=[[1, 2, 3]] * prompts, n=n, max_tokens=4, sampling=SamplingParams(seed=5), stops=[],
                logprobs=None, echo=False, stream=False, include_usage=False)


# ---- the protocols ----

def test_the_pool_and_the_fake_engine_implement_the_protocols():
    async def main():
        pool = ModelPool(PoolModel(name="m", path="/nonexistent", pieces=(b"a",)))
        handle = JobHandle(GenerationJob(1, [1], 4, SamplingParams()), pool)
        return pool, handle

    pool, handle = asyncio.run(main())
    assert isinstance(pool, Engine) and isinstance(FakeEngine(), Engine)
    assert isinstance(WorkerPool([]), Engines)
    assert isinstance(handle, JobTicket)
    assert pool.name == "m" and pool.prefix_cache is True and pool.pieces == (b"a",)


def test_the_http_side_names_no_engine_implementation():
    """Only the app factory picks the engine (the worker pool); nothing on the HTTP side names ctransformers'
    engine, its workers or the pool's internals."""
    forbidden = {"backends.engine", "backends.worker", "backends.pool", "backends.worker_pool", "backends.jobs",
                 "backends.supervision"}
    factory = {"backends.worker_pool", "backends.jobs"}  # app.py builds the pool from its spec types
    server = Path(__file__).resolve().parents[2] / "server"
    offenders = []
    for path in sorted(server.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name in forbidden and not (path.name == "app.py" and name in factory):
                    offenders.append(f"{path.relative_to(server.parent)}: {name}")
    assert not offenders, offenders


# ---- the pool's snapshot ----

def _worker(pool: ModelPool, index: int, pid: int, *, alive: bool = True, loaded: bool = True,
            busy: bool = False) -> WorkerProc:
    worker = WorkerProc(index=index, process=SimpleNamespace(pid=pid), conn=None, pid=pid, alive=alive,
                        limits=LIMITS if loaded else None)
    if busy:
        worker.job = JobHandle(GenerationJob(pool.new_job_id(), [1], 4, SamplingParams()), pool)
    pool.workers.append(worker)
    return worker


def _model_pool(workers: int = 3, max_queue: int = 5) -> ModelPool:
    return ModelPool(PoolModel(name="m", path="/nonexistent", workers=workers, max_queue=max_queue,
                               pieces=(b"a",)))


def test_a_healthy_pool_is_ready_with_its_counts():
    async def main() -> ModelStatus:
        pool = _model_pool()
        _worker(pool, 0, 101, busy=True)
        _worker(pool, 1, 102, busy=True)
        _worker(pool, 2, 103)
        for _ in range(2):
            pool.pending.append(JobHandle(GenerationJob(pool.new_job_id(), [1], 4, SamplingParams()), pool))
        pool.restarts = 4
        return pool.status()

    s = asyncio.run(main())
    assert (s.name, s.state, s.available, s.problem) == ("m", READY, True, None)
    assert (s.slots, s.running, s.queued, s.queue_capacity, s.capacity) == (3, 2, 2, 5, 8)
    assert (s.processes, s.alive, s.restarts, s.pids, s.retry_in) == (3, 3, 4, (101, 102, 103), None)
    assert s.started
    with pytest.raises(AttributeError):
        s.queued = 0  # a snapshot never changes


def test_a_pool_with_no_loaded_worker_is_restarting_and_lists_only_live_pids():
    async def main() -> ModelStatus:
        pool = _model_pool(workers=2)
        _worker(pool, 0, 201, alive=False)  # dead, its replacement not yet spawned
        _worker(pool, 1, 202, loaded=False)  # a replacement still loading
        pool.problem = "worker 0 was killed by signal 9 (SIGKILL)"
        return pool.status()

    s = asyncio.run(main())
    assert (s.state, s.available, s.alive, s.running, s.pids) == (RESTARTING, True, 0, 0, (202,))
    assert s.problem == "worker 0 was killed by signal 9 (SIGKILL)" and s.started


def test_a_pool_in_crash_cooldown_or_closing_is_unavailable():
    async def main() -> tuple[ModelStatus, ModelStatus]:
        cooling = _model_pool(workers=1)
        _worker(cooling, 0, 301)
        cooling.unavailable_until = time.monotonic() + 30
        closing = _model_pool(workers=1)
        _worker(closing, 0, 302)
        closing._closing = True
        return cooling.status(), closing.status()

    for s in asyncio.run(main()):
        assert (s.state, s.available, s.alive) == (UNAVAILABLE, False, 1) and s.started


def test_the_pools_snapshot_covers_every_model_loading_failed_or_serving_in_order():
    async def main() -> dict[str, ModelStatus]:
        specs = [PoolModel(name=n, path="/nonexistent", workers=2, max_queue=3, pieces=(b"a",))
                 for n in ("first", "broken", "served")]
        pools = WorkerPool(specs)
        served = ModelPool(specs[2])
        _worker(served, 0, 401)
        _worker(served, 1, 402, busy=True)
        pools.models = {"served": served}
        pools.failed = {"broken": "could not start it: OSError: too many open files"}
        pools._next_attempt["broken"] = time.monotonic() + 9.5
        return pools.status()

    statuses = asyncio.run(main())
    assert list(statuses) == ["first", "broken", "served"]
    first, broken, served = statuses.values()
    assert (first.state, first.available, first.problem, first.retry_in) == (LOADING, False, "not loaded yet", None)
    assert (broken.state, broken.problem, broken.retry_in) == (FAILED, "could not start it: OSError: too many "
                                                                       "open files", 10)
    for s in (first, broken):
        assert not s.started and (s.slots, s.processes, s.queue_capacity) == (2, 2, 3)
        assert (s.alive, s.running, s.queued, s.restarts, s.pids) == (0, 0, 0, 0, ())
    assert (served.state, served.running, served.alive, served.pids) == (READY, 1, 2, (401, 402))


# ---- admission against the fake engine ----

def test_admission_capacity_is_the_engines_slots_plus_its_queue():
    async def main():
        engine = FakeEngine(slots=8, queue_capacity=0)  # e.g. one process decoding 8 sequences together
        fits = Run(engine, _plan(prompts=2, n=4), retry_after=3)
        fits.submit()
        await fits.wait_first()
        assert len(engine.running) == 8 and engine.status().running == 8
        fits.cancel()
        too_many = Run(FakeEngine(slots=8, queue_capacity=2), _plan(prompts=1, n=11), retry_after=3)
        with pytest.raises(APIError) as err:
            too_many.submit()
        return err.value

    err = asyncio.run(main())
    assert (err.status, err.code, err.param) == (400, "too_many_generations", "n")
    assert "needs 11 generations" in err.message and "model fake can take at most 10 at once" in err.message


def test_a_full_queue_rejects_the_whole_request_and_cancels_what_it_had_queued():
    async def main():
        engine = FakeEngine(slots=1, queue_capacity=2)
        first = Run(engine, _plan(n=2), retry_after=3)
        first.submit()  # one runs, one waits
        second = Run(engine, _plan(n=2), retry_after=3)
        with pytest.raises(APIError) as err:
            second.submit()  # its first job takes the last queue place, its second does not fit
        return engine, second, err.value

    engine, second, err = asyncio.run(main())
    assert (err.status, err.code, err.headers) == (503, "queue_full", {"Retry-After": "3"})
    assert len(second.handles) == 1 and second.handles[0].done  # the job it had queued was cancelled
    assert engine.status().queued == 1 and engine.status().running == 1


def test_an_unavailable_engine_gives_503_with_its_retry_after():
    async def main():
        run = Run(FakeEngine(available=False), _plan(), retry_after=3)
        with pytest.raises(APIError) as err:
            run.submit()
        return err.value

    err = asyncio.run(main())
    assert (err.status, err.code, err.headers) == (503, "model_unavailable", {"Retry-After": "7"})


def test_a_run_merges_its_jobs_events_and_takes_prefix_reuse_from_the_engine():
    async def main():
        engine = FakeEngine(slots=1, queue_capacity=4, prefix_cache=True)
        run = Run(engine, _plan(n=2), retry_after=3, time_limit=9.0)
        run.submit()
        await run.wait_first()
        engine.finish(run.handles[0], [1, 2])  # the second job starts in the freed slot
        engine.finish(run.handles[1], [3])
        return engine, [(i, type(e).__name__) async for i, e in run.events()]

    engine, events = asyncio.run(main())
    assert events == [(0, "Started"), (0, "Tokens"), (0, "Finished"), (1, "Started"), (1, "Tokens"),
                      (1, "Finished")]
    assert [j.reuse_prefix for j in engine.submitted] == [True, True]
    assert [j.time_limit for j in engine.submitted] == [9.0, 9.0]
    assert [j.sampling.seed for j in engine.submitted] == [5, 6]
    assert len({j.job_id for j in engine.submitted}) == 2


# ---- /ready and /metrics read the snapshot ----

def _status(name: str, state: str, **kw) -> ModelStatus:
    base = dict(name=name, state=state, available=state in (READY, RESTARTING), slots=2, running=0, queued=0,
                queue_capacity=4, processes=2, alive=0, restarts=0, problem=None)
    return ModelStatus(**{**base, **kw})


class FakeEngines:
    def __init__(self, statuses: dict[str, ModelStatus]) -> None:
        self.statuses = statuses

    def get(self, name):
        return None

    def status(self) -> dict[str, ModelStatus]:
        return dict(self.statuses)

    def retry_in(self, name):
        return self.statuses[name].retry_in if name in self.statuses else None

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def _registry(*served: str) -> SimpleNamespace:
    entries = [SimpleNamespace(id=n, workers=2) for n in (*served, "gone")]
    return SimpleNamespace(served=[SimpleNamespace(spec=e) for e in entries if e.id != "gone"], entries=entries,
                           skipped={"gone": "file gone.bin is missing"}, not_downloaded=frozenset({"gone"}))


def test_ready_reads_each_models_state_and_details_from_the_snapshot():
    engines = FakeEngines({
        "ok": _status("ok", READY, alive=2, running=1, queued=3, restarts=1, pids=(11, 12)),
        "cool": _status("cool", UNAVAILABLE, alive=1, pids=(13,)),
        "back": _status("back", RESTARTING, problem="worker 0 exited with code 1"),
        "bad": _status("bad", FAILED, problem="its workers could not load the model", retry_in=4),
        "new": _status("new", LOADING, problem="not loaded yet"),
    })
    assert isinstance(engines, Engines)
    models, missing = model_states(_registry("ok", "cool", "back", "bad", "new", "later"), engines)
    assert models["ok"] == {"state": "ready", "available": True, "workers": 2, "alive": 2, "busy": 1, "queued": 3,
                            "restarts": 1, "worker_pids": [11, 12], "problem": None}
    assert {n: m["state"] for n, m in models.items()} == {
        "ok": "ready", "cool": "unavailable", "back": "restarting", "bad": "failed", "new": "loading",
        "later": "loading", "gone": "not_downloaded"}
    assert missing == {"cool": "unavailable after repeated worker crashes", "back": "worker 0 exited with code 1",
                       "bad": "its workers could not load the model", "new": "not loaded yet",
                       "later": "not loaded yet"}
    assert models["gone"]["problem"] == "file gone.bin is missing" and models["gone"]["workers"] == 2
    before, missing = model_states(_registry("ok"), None)  # the engines do not exist yet
    assert before["ok"]["state"] == "loading" and missing == {"ok": "not loaded yet"}


def test_metrics_read_the_snapshot_of_started_models_only():
    metrics = Metrics()
    metrics.watch_pool(FakeEngines({
        "ok": _status("ok", READY, alive=2, running=1, queued=3, restarts=1),
        "cool": _status("cool", UNAVAILABLE, alive=1),
        "new": _status("new", LOADING),
    }))
    text = generate_latest(metrics.registry).decode()
    for line in ('gpt4all_j_queue_depth_requests{model="ok"} 3.0', 'gpt4all_j_workers_busy{model="ok"} 1.0',
                 'gpt4all_j_workers_alive{model="ok"} 2.0', 'gpt4all_j_model_available{model="ok"} 1.0',
                 'gpt4all_j_worker_restarts_total{model="ok"} 1.0', 'gpt4all_j_model_available{model="cool"} 0.0',
                 'gpt4all_j_workers_alive{model="cool"} 1.0'):
        assert line in text, line
    assert 'model="new"' not in text
