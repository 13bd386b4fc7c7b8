"""WorkerPool.start: a model that fails to start is retried until it serves; a cancelled start (or
stop()) leaves no worker of any model running, including the models that had already loaded."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from backends.ggml.reader import read_vocab
from backends.pool import ModelPool, PoolModel
from backends.worker_pool import WorkerPool
from backends.types import Finished, GenerationJob, SamplingParams
from tests.models import write_random


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return write_random(tmp_path_factory.mktemp("start") / "small.bin", seed=5)


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


async def _until(predicate, timeout: float, what: str) -> None:
    """Wait for a condition; the bound only says "did not hang"."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def test_a_model_that_failed_to_start_is_retried_until_it_serves(small_model, tmp_path, caplog):
    """The first attempts fail (the file is not there yet: the worker cannot load it); they are
    retried with backoff, the reason is logged once and shown in `failed`, Retry-After is the time
    to the next attempt; once the file is there the model serves and leaves `failed`."""
    caplog.set_level(logging.DEBUG, logger="backends.pool")
    later = tmp_path / "later.bin"
    spec = PoolModel(name="later", path=str(later), pieces=tuple(read_vocab(small_model)))

    async def main() -> None:
        pool = WorkerPool([spec], load_timeout=60)
        await pool.start()
        try:
            assert pool.get("later") is None and "later" in pool.failed
            reason = pool.failed["later"]
            assert "later.bin" in reason or "No such file" in reason, reason
            await _until(lambda: caplog.text.count("retrying in") >= 3, 60, "the start was not retried")
            wait = pool.retry_in("later")
            assert isinstance(wait, int) and 1 <= wait <= 30
            assert pool.get("later") is None and pool.failed["later"] == reason
            shutil.copy(small_model, later)
            await _until(lambda: pool.get("later") is not None, 90, "the model never came up")
            assert "later" not in pool.failed and pool.retry_in("later") is None
            served = pool.get("later")
            assert served.alive == 1
            sink = asyncio.Queue()
            served.submit(GenerationJob(served.new_job_id(), [1, 2], 2, SamplingParams()), sink)
            while not isinstance((event := (await asyncio.wait_for(sink.get(), 60))[1]), Finished):
                pass
            assert event.completion_tokens >= 1
        finally:
            await pool.stop()

    asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "later" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in errors]  # one line per distinct reason
    assert "retrying in 0.5s" in errors[0].getMessage()
    assert "model later is serving after" in caplog.text


def test_stop_ends_the_retries_and_their_workers(tmp_path, small_model):
    """stop() while a failed model is being retried: no retry is left scheduled, no worker runs."""
    spec = PoolModel(name="never", path=str(tmp_path / "absent.bin"), pieces=tuple(read_vocab(small_model)))

    async def main() -> None:
        pool = WorkerPool([spec], load_timeout=60)
        await pool.start()
        assert "never" in pool.failed
        await asyncio.sleep(0.6)  # the first retry is under way (or about to be)
        await pool.stop()
        assert not multiprocessing.active_children()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not pending, pending

    asyncio.run(main())


def test_cancelling_start_also_stops_the_models_that_had_already_loaded(small_model, monkeypatch):
    """Model `fast` has loaded; model `stuck` is still loading (its worker is stopped) when the start
    is cancelled, as the lifespan does on SIGTERM, then stop() is awaited: no worker of either is left."""
    loaded: dict[str, bool] = {}
    real_start = ModelPool.start

    async def start(self, timeout=None):  # records which pools finished starting
        ok = await real_start(self, timeout)
        loaded[self.spec.name] = ok
        return ok

    monkeypatch.setattr(ModelPool, "start", start)

    async def main() -> list[int]:
        specs = [PoolModel(name="fast", path=str(small_model)), PoolModel(name="stuck", path=str(small_model))]
        pool = WorkerPool(specs, load_timeout=600)
        task = asyncio.create_task(pool.start())
        names: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while "stuck" not in names:
            assert time.monotonic() < deadline, "no worker was started"
            for p in multiprocessing.active_children():
                model = p.name.split(":")[1]
                if model not in names:
                    names[model] = p.pid
                    if model == "stuck":
                        os.kill(p.pid, signal.SIGSTOP)
            await asyncio.sleep(0.001)
        await _until(lambda: "fast" in loaded, 60, "the fast model did not load")
        assert loaded["fast"] is True and not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(pool.stop(), 30)
        return list(names.values())

    pids = asyncio.run(main())
    assert len(pids) == 2
    assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]
