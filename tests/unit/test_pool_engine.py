"""The engine: prompts evaluated chunk by chunk (watchdog progress) give the same logits; NaN logits fail."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from backends.engine import NON_FINITE, Engine
from backends.types import ErrorKind, Failed, Finished, GenerationJob, SamplingParams, Started, Tokens
from tests.models import engine_logits, load_engine, write_random
from tests.models_corrupt import write_nan_model

pytest.importorskip("ctransformers")


class Counter:
    """Stands in for the shared RawValue the pool passes to a worker."""

    value = 0


@pytest.mark.parametrize("length", [1, 7, 8, 9, 45])
def test_chunked_prefill_gives_the_engines_own_logits(tmp_path, length):
    """Engine.prefill evaluates batch_size tokens per call (to show progress); ctransformers' own
    batch_eval of the whole prompt in one call must give bit-identical logits."""
    path = write_random(tmp_path / "m.bin", n_ctx=128, n_embd=64, seed=5)
    prompt = [int(t) for t in np.random.default_rng(length).integers(0, 512, length)]
    counter = Counter()
    engine = Engine(str(path), threads=1, batch_size=8, progress=counter)
    engine.prefill(prompt)
    ours = np.array(engine.logits(), dtype=np.float32)
    assert counter.value == -(-length // 8)  # one beat per chunk

    ref = load_engine(path)
    arr = (ctypes.c_int * length)(*prompt)
    assert ref.ctransformers_llm_batch_eval(arr, length, 0, 8, 1)
    theirs = engine_logits(ref, 512)
    assert np.array_equal(ours, theirs)


def _run(engine: Engine, job: GenerationJob) -> list:
    return list(engine.run(job, lambda: False))


def test_nan_weights_fail_the_job_after_the_prompt(tmp_path):
    engine = Engine(str(write_nan_model(tmp_path / "nan.bin")))
    events = _run(engine, GenerationJob(1, [1, 2, 3], 5, SamplingParams()))
    assert [type(e) for e in events] == [Started, Failed]
    assert events[-1].kind == ErrorKind.INTERNAL and events[-1].message == NON_FINITE
    assert "corrupt" in NON_FINITE and not engine.context  # nothing cached from the broken evaluation


def test_nan_appearing_mid_generation_is_caught_when_logits_are_inspected(tmp_path):
    """Only token 9's embedding is NaN: the logits turn NaN once it is generated and evaluated.
    With logprobs (a numpy view of every step's logits) the next step fails instead of emitting NaN."""
    engine = Engine(str(write_nan_model(tmp_path / "nan9.bin", token=9)))
    sampling = SamplingParams(temperature=0.0, logit_bias={9: 100.0})
    events = _run(engine, GenerationJob(1, [1, 2, 3], 5, sampling, logprobs=2))
    assert [type(e) for e in events] == [Started, Tokens, Failed], events
    assert events[1].ids == [9] and np.isfinite(events[1].logprobs[0].logprob)
    assert events[-1].message == NON_FINITE


def test_healthy_model_runs_to_the_end(tmp_path):
    engine = Engine(str(write_random(tmp_path / "ok.bin")))
    events = _run(engine, GenerationJob(1, [1, 2, 3], 4, SamplingParams(logit_bias={292: -100.0}), logprobs=1))
    assert isinstance(events[-1], Finished) and events[-1].completion_tokens == 4


def test_a_zero_time_limit_ends_at_once_with_length(tmp_path):
    """A job that reaches its worker after its request's deadline gets time_limit 0: no tokens."""
    engine = Engine(str(write_random(tmp_path / "ok.bin")))
    events = _run(engine, GenerationJob(1, [1, 2, 3], 50, SamplingParams(), time_limit=0.0))
    assert isinstance(events[-1], Finished) and events[-1].timed_out and events[-1].completion_tokens == 0
