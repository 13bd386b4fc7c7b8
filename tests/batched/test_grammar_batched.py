"""Constrained decoding in the batched engine process: per-row grammar masks in a shared batch."""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
import time

import jsonschema
import pytest

from tests.batched import require_ggml

require_ggml()

from backends.batched.process import batched_main
from backends.ggml.writer import default_vocab
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
from backends.worker import unpack_tokens
from tests.models import successor_vocab, write_random, write_successor
from tests.schemas import BOUNDED_OBJECT

SPAWN = mp.get_context("spawn")
TIMEOUT = 30.0
SCHEMA = BOUNDED_OBJECT


class Proc:
    """A spawned batched engine process (4 slots) and its end of the pipe."""

    def __init__(self, path, vocab: list[bytes], n_ctx: int) -> None:
        self.conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=batched_main, args=(child, str(path), 4, 1, 8), kwargs={"n_ctx": n_ctx},
                                  daemon=True)
        self.proc.start()
        child.close()
        self.vocab = vocab
        assert self.recv(60)[0] == "ready"

    def recv(self, timeout=TIMEOUT):
        assert self.conn.poll(timeout), "no message from the engine process"
        data = self.conn.recv_bytes()
        tokens = unpack_tokens(data)
        return pickle.loads(data) if tokens is None else Tokens(tokens[0], tokens[1], [])

    def run(self, jobs: list[GenerationJob]) -> dict[int, tuple[list[int], object]]:
        """Submit jobs together; per job (token ids, last event)."""
        for job in jobs:
            self.conn.send(("job", job))
        out = {job.job_id: ([], None) for job in jobs}
        deadline = time.monotonic() + TIMEOUT
        while any(last is None for _, last in out.values()):
            assert time.monotonic() < deadline, "jobs did not end"
            ev = self.recv()
            if isinstance(ev, Tokens):
                out[ev.job_id][0].extend(ev.ids)
            elif not isinstance(ev, Started):
                out[ev.job_id] = (out[ev.job_id][0], ev)
        return out

    def text(self, ids: list[int]) -> bytes:
        return b"".join(self.vocab[t] for t in ids)

    def stop(self) -> None:
        self.conn.send(("exit", None))
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


@pytest.fixture(scope="module")
def random_proc(tmp_path_factory):
    path = write_random(tmp_path_factory.mktemp("grammar") / "random.bin", n_ctx=512)
    proc = Proc(path, default_vocab(512), 512)
    yield proc
    proc.stop()


def test_constrained_rows_validate_beside_an_unconstrained_one(random_proc):
    constraint = json_schema(SCHEMA)
    jobs = [GenerationJob(i, [5, 300 + i, 17], 300, SamplingParams(temperature=1.0, seed=i, constraint=constraint),
                          reuse_prefix=False) for i in range(1, 4)]
    jobs.append(GenerationJob(9, [5, 300, 17], 30, SamplingParams(temperature=1.0, seed=1), reuse_prefix=False))
    out = random_proc.run(jobs)
    for i in range(1, 4):
        ids, last = out[i]
        assert last == Finished(i, FinishReason.STOP, len(ids)), last
        jsonschema.validate(json.loads(random_proc.text(ids)), SCHEMA)
    ids, last = out[9]
    assert last == Finished(9, FinishReason.LENGTH, 30)
    with pytest.raises(ValueError):  # free text: the other rows' grammars did not leak into it
        json.loads(random_proc.text(ids))


def test_length_cut_and_bad_grammar(random_proc):
    bad = Constraint('{"grammars": [{"lark_grammar": "start: nothing_here"}]}')
    out = random_proc.run([
        GenerationJob(20, [5, 6], 3, SamplingParams(seed=2, constraint=json_schema(SCHEMA)), reuse_prefix=False),
        GenerationJob(21, [5, 6], 3, SamplingParams(constraint=bad)),
    ])
    assert out[20][1] == Finished(20, FinishReason.LENGTH, 3)
    assert isinstance(out[21][1], Failed) and "nothing_here" in out[21][1].message


def test_unconstrained_neighbour_is_unaffected(tmp_path):
    """Greedy on the large-margin successor model: the same tokens alone and beside a constrained row."""
    vocab, _ = successor_vocab()
    proc = Proc(write_successor(tmp_path / "succ.bin", n_ctx=128), vocab, 128)
    try:
        plain = GenerationJob(1, [ord("a")], 40, SamplingParams(temperature=0.0), reuse_prefix=False)
        alone = proc.run([plain])[1]
        schema = {"type": "object", "properties": {"k": {"enum": ["ab", "cd"]}}, "required": ["k"],
                  "additionalProperties": False}
        constrained = GenerationJob(2, [ord("a")], 40, SamplingParams(temperature=0.0, constraint=json_schema(schema)),
                                    reuse_prefix=False)
        together = proc.run([constrained, plain])
        assert together[1] == alone and proc.text(alone[0]) == b"bcdefghijklmnopqrstuvwxyz"
        ids, last = together[2]
        assert last == Finished(2, FinishReason.STOP, len(ids))
        jsonschema.validate(json.loads(proc.text(ids)), schema)
    finally:
        proc.stop()
