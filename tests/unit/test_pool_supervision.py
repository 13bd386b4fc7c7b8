"""Worker supervision: plain-word exits, retry delays, request groups, and real worker processes
(cancelled start, stalled worker, replacement that hangs while loading)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from backends.jobs import JobGroup, out_of_time, with_time_left
from backends.pool import ModelPool, PoolModel, PoolPolicy
from backends.worker_pool import WorkerPool
from backends.supervision import crash_delay, describe_exit, spawn_retry_delay
from backends.types import Failed, Finished, GenerationJob, SamplingParams, Tokens
from tests.models import RANDOM_EOS_ID, write_random

NO_EOS = SamplingParams(logit_bias={RANDOM_EOS_ID: -100.0})


def test_exits_are_described_in_plain_words():
    assert describe_exit(-9) == "was killed by signal 9 (SIGKILL)"
    assert describe_exit(-11) == "was killed by signal 11 (SIGSEGV)"
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(0) == "exited with code 0"
    assert "None" not in describe_exit(None)
    assert describe_exit(-200) == "was killed by signal 200"


def test_retry_delays_grow_and_are_capped():
    assert [spawn_retry_delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert spawn_retry_delay(50) == 30.0
    assert crash_delay(1) == 0.1 and crash_delay(30) == 5.0


def test_a_request_clock_starts_at_its_first_dispatch_and_is_shared():
    group = JobGroup()
    job = GenerationJob(1, [1], 10, SamplingParams(), time_limit=3.0)
    first = with_time_left(job, group, now=100.0)
    assert group.started and group.deadline == 103.0 and first.time_limit == 3.0
    assert with_time_left(job, group, now=102.5).time_limit == pytest.approx(0.5)
    assert with_time_left(job, group, now=104.0).time_limit == 0.0
    unlimited = JobGroup()
    assert with_time_left(GenerationJob(2, [1], 10, SamplingParams()), unlimited, 5.0).time_limit is None
    assert unlimited.started and not out_of_time(unlimited) and not out_of_time(None)
    group.deadline = time.monotonic() - 1
    assert out_of_time(group)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> Path:
    return write_random(tmp_path_factory.mktemp("sup") / "slow.bin", n_ctx=2048, n_embd=256, n_layer=4, seed=3)


def _pool(path: Path, **policy) -> ModelPool:
    return ModelPool(PoolModel(name="m", path=str(path), max_queue=4), PoolPolicy(**policy), load_timeout=60)


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def test_cancelling_start_kills_the_loading_workers_at_once(slow_model):
    """The lifespan cancels WorkerPool.start when SIGTERM arrives during a load: every worker spawned
    so far is killed at once (no grace) and the cancellation propagates."""
    import multiprocessing

    async def main() -> list[int]:
        specs = [PoolModel(name=f"m{i}", path=str(slow_model), workers=w) for i, w in ((0, 2), (1, 1))]
        task = asyncio.create_task(WorkerPool(specs, load_timeout=60).start())
        while len(multiprocessing.active_children()) < 3:
            await asyncio.sleep(0.001)
        pids = [p.pid for p in multiprocessing.active_children()]
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < 3.0  # no 5 s grace
        return pids

    pids = asyncio.run(main())
    assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]


async def _events(sink: asyncio.Queue, job_id: int, until, timeout: float = 30.0) -> list:
    """Events of one job until `until(event)` holds."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        _, event = await asyncio.wait_for(sink.get(), deadline - time.monotonic())
        if event.job_id == job_id:
            out.append(event)
            if until(event):
                return out


def test_a_stalled_worker_is_killed_replaced_and_the_queue_moves_on(slow_model, caplog):
    caplog.set_level(logging.INFO, logger="backends.pool")

    async def main() -> None:
        pool = _pool(slow_model, stall_timeout=1.0)
        assert await pool.start()
        try:
            first, second = asyncio.Queue(), asyncio.Queue()
            pool.submit(GenerationJob(pool.new_job_id(), [1, 2], 1800, NO_EOS), first)
            pool.submit(GenerationJob(pool.new_job_id(), [3, 4], 4, NO_EOS), second)
            await _events(first, 1, lambda e: isinstance(e, Tokens))
            victim = pool.workers[0].pid
            os.kill(victim, signal.SIGSTOP)
            events = await _events(first, 1, lambda e: isinstance(e, (Finished, Failed)))
            assert isinstance(events[-1], Failed), events[-1]
            assert "stopped making progress" in events[-1].message
            done = await _events(second, 2, lambda e: isinstance(e, (Finished, Failed)))
            assert isinstance(done[-1], Finished) and done[-1].completion_tokens == 4
            assert pool.workers[0].pid != victim and _gone(victim) and pool.problem is None
        finally:
            await pool.stop(grace=1)

    asyncio.run(main())
    assert "made no progress" in caplog.text and "killed by signal 9 (SIGKILL)" in caplog.text


def test_a_job_sent_to_a_worker_that_never_takes_it_is_served_by_the_replacement(slow_model, caplog):
    caplog.set_level(logging.INFO, logger="backends.pool")

    async def main() -> None:
        pool = _pool(slow_model, stall_timeout=1.0)
        assert await pool.start()
        try:
            victim = pool.workers[0].pid
            os.kill(victim, signal.SIGSTOP)  # idle: nothing to notice yet
            sink = asyncio.Queue()
            pool.submit(GenerationJob(pool.new_job_id(), [1, 2], 4, NO_EOS), sink)
            done = await _events(sink, 1, lambda e: isinstance(e, (Finished, Failed)))
            assert isinstance(done[-1], Finished) and done[-1].completion_tokens == 4, done
            assert pool.workers[0].pid != victim and _gone(victim)
        finally:
            await pool.stop(grace=1)

    asyncio.run(main())
    assert "made no progress for" in caplog.text and "while given a job" in caplog.text


def test_a_replacement_that_hangs_while_loading_is_killed_and_retried(slow_model, caplog):
    caplog.set_level(logging.INFO, logger="backends.pool")

    async def main() -> None:
        pool = _pool(slow_model)
        assert await pool.start()
        try:
            pool.load_timeout = 1.0
            victim = pool.workers[0].pid
            os.kill(victim, signal.SIGKILL)
            while pool.workers[0].pid == victim:  # the replacement comes 0.1 s later
                await asyncio.sleep(0.002)
            stuck = pool.workers[0].pid
            os.kill(stuck, signal.SIGSTOP)  # a few ms into its start: it cannot have loaded yet
            deadline = time.monotonic() + 30
            while not (pool.alive == 1 and pool.workers[0].pid not in (victim, stuck)):
                assert time.monotonic() < deadline, "no working replacement"
                await asyncio.sleep(0.05)
            assert _gone(stuck) and pool.problem is None
            sink = asyncio.Queue()
            pool.submit(GenerationJob(pool.new_job_id(), [1], 3, NO_EOS), sink)
            assert isinstance((await _events(sink, 1, lambda e: isinstance(e, (Finished, Failed))))[-1], Finished)
        finally:
            await pool.stop(grace=1)

    asyncio.run(main())
    assert "did not load the model within 1s" in caplog.text


def test_a_failed_restart_is_shown_as_the_pools_problem_and_retried(slow_model):
    """No file can be opened when the worker dies: pool.problem says why, until a retry succeeds."""
    import resource

    async def main() -> None:
        pool = _pool(slow_model)
        assert await pool.start()
        assert pool.problem is None
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            victim = pool.workers[0].pid
            resource.setrlimit(resource.RLIMIT_NOFILE, (0, hard))
            try:
                os.kill(victim, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while "Too many open files" not in (pool.problem or ""):
                    assert time.monotonic() < deadline, pool.problem
                    await asyncio.sleep(0.01)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert pool.problem.startswith("could not start a replacement for worker 0: OSError: [Errno 24]")
            deadline = time.monotonic() + 30
            while pool.alive < 1:
                assert time.monotonic() < deadline, pool.problem
                await asyncio.sleep(0.05)
            assert pool.problem is None and pool.workers[0].pid != victim
        finally:
            await pool.stop(grace=1)

    asyncio.run(main())


class _GatedProcess:
    """A process whose exit status becomes readable only once the event loop has run other callbacks
    (as after a real exit: the sentinel is readable a moment before waitpid has the status)."""

    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate
        self.pid = 4242
        self.sentinel = -1

    @property
    def exitcode(self):
        return -9 if self.gate.is_set() else None

    def kill(self) -> None:
        pass


class _DeadConn:
    def poll(self) -> bool:
        return False

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


def test_reading_a_workers_exit_status_does_not_block_the_event_loop():
    """The exit status is read without sleeping on the loop: other callbacks run meanwhile (here, the one
    that makes the status readable), and the job's error says how the worker ended, never 'None'."""
    from backends.jobs import JobHandle, WorkerProc

    async def main() -> Failed:
        pool = ModelPool(PoolModel(name="m", path="/nonexistent", pieces=(b"a",)), PoolPolicy(), load_timeout=60)
        gate = asyncio.Event()
        worker = WorkerProc(index=0, process=_GatedProcess(gate), conn=_DeadConn(), pid=4242)
        sink = asyncio.Queue()
        worker.job = JobHandle(GenerationJob(1, [1], 4, SamplingParams()), pool, sink)
        pool.workers.append(worker)
        asyncio.get_running_loop().call_soon(gate.set)
        pool._exited(worker)  # the sentinel callback
        _, event = await asyncio.wait_for(sink.get(), 10)
        return event

    event = asyncio.run(main())
    assert isinstance(event, Failed), event
    assert "was killed by signal 9 (SIGKILL)" in event.message, event.message
