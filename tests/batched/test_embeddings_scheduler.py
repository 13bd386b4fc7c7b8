"""The scheduler's embedding jobs (pure logic, a fake core): inputs share steps, slots are freed at once."""

from __future__ import annotations

import numpy as np

from backends.batched.scheduler import Scheduler, run_plan
from backends.types import (Embedding, ErrorKind, Failed, Finished, FinishReason, GenerationJob, SamplingParams,
                            Started, Tokens)

V, E = 50, 3  # vocabulary, hidden size of the fake core


def hidden_of(token: int, position: int) -> np.ndarray:
    """The fake core's final hidden state of a token at a position."""
    return np.array([1.0 + token, 0.5 * position, 2.0])


def expected(prompt: list[int]) -> np.ndarray:
    mean = np.mean([hidden_of(t, p) for p, t in enumerate(prompt)], axis=0)
    return (mean / np.linalg.norm(mean)).astype("<f4")


class PoolingCore:
    """Logits pick last token + 1; hidden states are hidden_of(token, position); records every step."""

    def __init__(self, n_slots: int, n_ctx: int) -> None:
        self.n_ctx = n_ctx
        self.cache: list[list[int]] = [[] for _ in range(n_slots)]
        self.steps: list[tuple] = []
        self.poison: set[int] = set()  # tokens whose hidden state is NaN

    def reset(self, slot: int, keep: int) -> None:
        del self.cache[slot][keep:]

    def step(self, decodes, chunk):
        logits, last, _ = self.step_pooled(decodes, chunk, [])
        return logits, last

    def step_pooled(self, decodes, chunk, pooled):
        slots = [s for s, _ in decodes] + ([chunk[0]] if chunk else []) + [s for s, _ in pooled]
        assert len(set(slots)) == len(slots), slots
        self.steps.append((list(decodes), chunk, list(pooled)))
        rows = np.zeros((len(decodes), V), dtype=np.float32)
        for i, (s, t) in enumerate(decodes):
            self.cache[s].append(t)
            rows[i, (t + 1) % V] = 1.0
        last = None
        if chunk is not None:
            self.cache[chunk[0]].extend(chunk[1])
            last = np.zeros(V, dtype=np.float32)
            last[(chunk[1][-1] + 1) % V] = 1.0
        sums = []
        for s, toks in pooled:
            start = len(self.cache[s])
            self.cache[s].extend(toks)
            sums.append(sum(np.full(E, np.nan) if t in self.poison else hidden_of(t, start + i)
                            for i, t in enumerate(toks)))
        assert all(len(c) <= self.n_ctx for c in self.cache)
        return rows, last, sums


class Harness:
    def __init__(self, n_slots=4, n_ctx=64, chunk=4) -> None:
        self.core = PoolingCore(n_slots, n_ctx)
        self.events: list = []
        self.sched = Scheduler(n_slots, n_ctx, V - 1, lambda row, seq: int(np.argmax(row)), self.events.append,
                               chunk=chunk, n_vocab=V)
        self.next_id = 0

    def submit(self, prompt, embed=True, max_tokens=None) -> int:
        self.next_id += 1
        self.sched.submit(GenerationJob(self.next_id, list(prompt), 0 if embed else max_tokens,
                                        SamplingParams(temperature=0.0), reuse_prefix=not embed, embed=embed))
        return self.next_id

    def step(self):
        plan = self.sched.plan_step()
        if plan is not None:
            self.sched.apply(run_plan(self.core, plan))
        return plan

    def run(self) -> None:
        for _ in range(1000):
            if self.sched.idle:
                return
            assert self.step() is not None
        raise AssertionError("did not finish")

    def of(self, job_id):
        return [e for e in self.events if e.job_id == job_id]

    def vector(self, job_id) -> np.ndarray:
        got = [e for e in self.of(job_id) if isinstance(e, Embedding)]
        assert len(got) == 1
        return np.frombuffer(got[0].vector, "<f4")


def test_short_inputs_are_read_in_one_step_together():
    h = Harness(n_slots=4, chunk=4)
    prompts = [[1, 2], [3], [4, 5, 6], [7, 8]]
    ids = [h.submit(p) for p in prompts]
    plan = h.step()
    assert plan.decodes == [] and plan.chunk is None
    assert sorted(len(p) for _, p in plan.pooled) == sorted(len(p) for p in prompts)
    assert h.sched.idle and h.sched.running == 0  # every slot is free again
    for i, p in zip(ids, prompts):
        ev = h.of(i)
        assert [type(e) for e in ev] == [Started, Embedding, Finished]
        assert ev[0].prompt_tokens == len(p) and ev[0].cached_tokens == 0
        assert ev[2].reason == FinishReason.STOP and ev[2].completion_tokens == 0
        assert np.allclose(h.vector(i), expected(p), atol=1e-6)


def test_a_step_reads_at_most_chunk_plus_slots_tokens_and_long_inputs_span_steps():
    h = Harness(n_slots=3, chunk=4)  # at most 7 tokens a step
    prompts = [list(range(1, 20)), list(range(20, 31)), [40, 41]]
    ids = [h.submit(p) for p in prompts]
    h.run()
    for _, chunk, pooled in h.core.steps:
        assert sum(len(p) for _, p in pooled) + (len(chunk[1]) if chunk else 0) <= 7
    assert any(len(pooled) > 1 for _, _, pooled in h.core.steps)  # inputs shared steps
    for i, p in zip(ids, prompts):
        assert np.allclose(h.vector(i), expected(p), atol=1e-6)


def test_embeddings_share_steps_with_generation_which_is_unchanged():
    alone = Harness(n_slots=4, chunk=4)
    g = alone.submit([1, 2, 3, 4, 5, 6], embed=False, max_tokens=5)
    alone.run()
    h = Harness(n_slots=4, chunk=4)
    g2 = h.submit([1, 2, 3, 4, 5, 6], embed=False, max_tokens=5)
    e = h.submit(list(range(10, 22)))
    h.run()
    tokens = [t for ev in alone.of(g) if isinstance(ev, Tokens) for t in ev.ids]
    assert [t for ev in h.of(g2) if isinstance(ev, Tokens) for t in ev.ids] == tokens == [7, 8, 9, 10, 11]
    assert any(chunk is not None and pooled or decodes and pooled for decodes, chunk, pooled in h.core.steps)
    assert np.allclose(h.vector(e), expected(list(range(10, 22))), atol=1e-6)


def test_more_inputs_than_slots_wait_fifo():
    h = Harness(n_slots=2, chunk=2)
    ids = [h.submit([i + 1] * 3) for i in range(5)]
    h.run()
    done = [e.job_id for e in h.events if isinstance(e, Finished)]
    assert done == ids
    for i in ids:
        assert np.allclose(h.vector(i), expected([i] * 3), atol=1e-6)


def test_cancel_while_reading_frees_the_slot_and_emits_no_vector():
    h = Harness(n_slots=1, chunk=2)
    a = h.submit(list(range(1, 12)))
    h.step()
    assert h.sched.cancel(a)
    assert h.sched.running == 0
    assert [type(e) for e in h.of(a)] == [Finished] and h.of(a)[0].reason == FinishReason.CANCELLED
    b = h.submit([3, 4])
    h.run()
    assert np.allclose(h.vector(b), expected([3, 4]), atol=1e-6)


def test_cancel_between_plan_and_apply_drops_the_input():
    h = Harness(n_slots=2, chunk=4)
    a = h.submit([1, 2])
    plan = h.sched.plan_step()
    h.sched.cancel(a)
    h.sched.apply(run_plan(h.core, plan))
    assert [type(e) for e in h.of(a)] == [Finished] and h.sched.idle


def test_inputs_that_cannot_be_read_fail_at_once():
    h = Harness(n_slots=2, n_ctx=8)
    assert not h.sched.submit(GenerationJob(1, list(range(9)), 0, SamplingParams(), embed=True))
    assert not h.sched.submit(GenerationJob(2, [1, V], 0, SamplingParams(), embed=True))
    assert not h.sched.submit(GenerationJob(3, [], 0, SamplingParams(), embed=True))
    kinds = [(e.job_id, e.kind) for e in h.events]
    assert kinds == [(1, ErrorKind.CONTEXT_LENGTH), (2, ErrorKind.INVALID_REQUEST), (3, ErrorKind.INVALID_REQUEST)]
    assert h.sched.submit(GenerationJob(4, list(range(8)), 0, SamplingParams(), embed=True))  # exactly n_ctx fits


def test_an_input_is_read_whole_even_when_its_slot_holds_its_prefix():
    h = Harness(n_slots=1, chunk=8)
    g = h.submit([1, 2, 3, 4], embed=False, max_tokens=1)
    h.run()
    e = h.submit([1, 2, 3, 4, 9])
    plan = h.step()
    assert plan.resets == [(0, 0)] and plan.pooled == [(0, [1, 2, 3, 4, 9])]
    assert np.allclose(h.vector(e), expected([1, 2, 3, 4, 9]), atol=1e-6)
    assert h.of(g)[-1].reason == FinishReason.LENGTH


def test_non_finite_hidden_states_fail_the_input_only():
    h = Harness(n_slots=2, chunk=4)
    h.core.poison.add(7)
    bad, good = h.submit([1, 7]), h.submit([2, 3])
    h.run()
    assert isinstance(h.of(bad)[-1], Failed) and h.of(bad)[-1].kind == ErrorKind.INTERNAL
    assert np.allclose(h.vector(good), expected([2, 3]), atol=1e-6)


def test_while_streams_decode_embeddings_only_fill_the_row_tile_the_step_uses():
    """A step's cost grows with its row tiles (16 rows): beside running streams, embedding rows fill the tile the
    decodes open and no more, so an embedding flood does not slow the streams by whole tiles; alone they take
    the full chunk + slots."""
    from backends.batched.scheduler import ROW_TILE

    long = [3 + i % 40 for i in range(200)]
    h = Harness(n_slots=8, n_ctx=512, chunk=32)
    h.submit([1, 2], embed=False, max_tokens=400)
    h.step()  # the stream's prompt; it decodes from now on
    for i in range(6):
        h.submit(long, embed=True)
    for _ in range(20):
        h.step()
        decodes, chunk, pooled = h.core.steps[-1]
        assert decodes and chunk is None and pooled
        assert len(decodes) + sum(len(t) for _, t in pooled) <= ROW_TILE
    alone = Harness(n_slots=8, n_ctx=512, chunk=32)
    alone.submit(long, embed=True)
    alone.submit(long, embed=True)
    alone.step()
    assert sum(len(t) for _, t in alone.core.steps[-1][2]) == 32 + 8
