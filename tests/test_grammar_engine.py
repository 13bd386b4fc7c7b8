"""Constrained decoding in the ctransformers engine (backends/engine.py) on a random-weights model."""

from __future__ import annotations

import json

import jsonschema
import pytest

from backends.engine import Engine
from backends.grammar import Constraint, json_schema
from backends.types import (
    Failed,
    Finished,
    FinishReason,
    GenerationJob,
    SamplingParams,
    Started,
    Tokens,
)
from tests.models import write_random
from tests.schemas import BOUNDED_OBJECT

SCHEMA = BOUNDED_OBJECT
PROMPT = [5, 300, 17, 42]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_random(tmp_path_factory.mktemp("grammar") / "random.bin", n_ctx=512)
    return Engine(str(path), threads=1)


def run(engine: Engine, sampling: SamplingParams, max_tokens: int = 300, logprobs: int | None = None):
    """(token ids, final event, logprobs) of one job."""
    job = GenerationJob(1, PROMPT, max_tokens, sampling, logprobs=logprobs, reuse_prefix=False)
    ids, lps, last = [], [], None
    for event in engine.run(job, lambda: False):
        if isinstance(event, Tokens):
            ids += event.ids
            lps += event.logprobs or []
        elif not isinstance(event, Started):
            last = event
    return ids, last, lps


@pytest.mark.parametrize("seed", range(6))
def test_constrained_output_validates_and_stops(engine, seed):
    sampling = SamplingParams(temperature=1.0, seed=seed, constraint=json_schema(SCHEMA))
    ids, last, _ = run(engine, sampling)
    assert last == Finished(1, FinishReason.STOP, len(ids))
    jsonschema.validate(json.loads(b"".join(engine.pieces[t] for t in ids)), SCHEMA)


def test_length_cut_ends_with_length(engine):
    ids, last, _ = run(engine, SamplingParams(seed=1, constraint=json_schema(SCHEMA)), max_tokens=3)
    assert last == Finished(1, FinishReason.LENGTH, 3) and len(ids) == 3


def test_unconstrained_jobs_are_unaffected(engine):
    plain = SamplingParams(temperature=0.8, seed=3)
    before = run(engine, plain, max_tokens=40, logprobs=2)
    run(engine, SamplingParams(seed=3, constraint=json_schema(SCHEMA)))
    assert run(engine, plain, max_tokens=40, logprobs=2) == before
    assert before[0] != run(engine, SamplingParams(temperature=0.8, seed=3, constraint=json_schema(SCHEMA)),
                            max_tokens=40)[0]


def test_logprobs_are_the_models_own(engine):
    ids, _, lps = run(engine, SamplingParams(temperature=0.0, constraint=json_schema(SCHEMA)), logprobs=5)
    assert engine.pieces[ids[0]] == b"{"  # forced by the grammar
    assert len(lps) == len(ids) and lps[0].logprob < -0.01  # not the masked distribution's probability 1
    assert any(piece != b"{" for piece, _ in lps[0].top)


def test_a_grammar_that_does_not_compile_fails_the_job(engine):
    bad = Constraint('{"grammars": [{"lark_grammar": "start: nothing_here"}]}')
    _, last, _ = run(engine, SamplingParams(constraint=bad))
    assert isinstance(last, Failed) and "nothing_here" in last.message
