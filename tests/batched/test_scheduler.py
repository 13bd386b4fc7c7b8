"""The continuous-batching scheduler (backends/batched/scheduler.py) against a fake successor core.

The fake core's next token is last + 1 mod V, so every sequence's greedy output is known; it checks
what a real core would refuse (a slot twice in one step, overflow, resets past the cached length)
and keeps each slot's tokens, so prefix reuse can be checked against what the cache really holds.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.batched import require_ggml

require_ggml()  # backends.batched's package imports ggml; the scheduler itself does not

from backends.batched.scheduler import Scheduler, run_plan
from backends.types import (
    ErrorKind,
    Failed,
    Finished,
    FinishReason,
    GenerationJob,
    SamplingParams,
    Started,
    Tokens,
)

V = 50


class FakeCore:
    """A batched core whose logits pick last token + 1 (mod V)."""

    def __init__(self, n_slots: int, n_ctx: int, chunk: int) -> None:
        self.n_ctx, self.chunk = n_ctx, chunk
        self.cache: list[list[int]] = [[] for _ in range(n_slots)]
        self.steps: list[tuple[list, tuple | None]] = []

    def reset(self, slot: int, keep: int) -> None:
        assert 0 <= keep <= len(self.cache[slot])
        del self.cache[slot][keep:]

    def step(self, decodes, chunk):
        slots = [s for s, _ in decodes] + ([chunk[0]] if chunk else [])
        assert slots and len(set(slots)) == len(slots), slots
        self.steps.append((list(decodes), chunk))
        rows = np.zeros((len(decodes), V), dtype=np.float32)
        for i, (s, t) in enumerate(decodes):
            self.cache[s].append(t)
            rows[i, (t + 1) % V] = 1.0
        last = None
        if chunk is not None:
            assert 0 < len(chunk[1]) <= self.chunk
            self.cache[chunk[0]].extend(chunk[1])
            last = np.zeros(V, dtype=np.float32)
            last[(chunk[1][-1] + 1) % V] = 1.0
        assert all(len(c) <= self.n_ctx for c in self.cache)
        return rows, last


def argmax(row, seq):
    return int(np.argmax(row))


class Harness:
    """A scheduler, its fake core and the events it emitted."""

    def __init__(self, n_slots=4, n_ctx=64, chunk=4, eos=V - 1, **kw) -> None:
        self.core = FakeCore(n_slots, n_ctx, chunk)
        self.events: list = []
        self.sched = Scheduler(n_slots, n_ctx, eos, argmax, self._emit, chunk=chunk, n_vocab=V, **kw)
        self.next_id = 0

    def _emit(self, ev) -> None:
        if isinstance(ev, Started):  # the cache holds exactly the prompt once it is evaluated
            seq = self.sched.sequences[ev.job_id]
            assert self.core.cache[seq.slot] == seq.prompt
        self.events.append(ev)

    def submit(self, prompt, max_tokens=None, **kw) -> int:
        self.next_id += 1
        job = GenerationJob(self.next_id, list(prompt), max_tokens, SamplingParams(temperature=0.0), **kw)
        self.sched.submit(job)
        return self.next_id

    def step(self):
        plan = self.sched.plan_step()
        s = self.sched  # admission fills every free slot before a step runs
        assert s.queued == 0 or s.running == len(s.slots)
        if plan is not None:
            self.sched.apply(run_plan(self.core, plan))
        return plan

    def run(self, limit=10_000) -> None:
        while not self.sched.idle:
            assert self.step() is not None
            limit -= 1
            assert limit > 0

    def of(self, job_id):
        return [e for e in self.events if e.job_id == job_id]

    def tokens(self, job_id):
        return [t for e in self.of(job_id) if isinstance(e, Tokens) for t in e.ids]

    def end(self, job_id):
        return self.of(job_id)[-1]


def chain(prompt, n, eos=V - 1):
    """The successor core's greedy output: up to n tokens, EOS excluded."""
    out, t = [], prompt[-1]
    while len(out) < n:
        t = (t + 1) % V
        if t == eos:
            break
        out.append(t)
    return out


def test_one_sequence_follows_the_successor_chain():
    h = Harness()
    j = h.submit([1, 2, 3], max_tokens=5)
    h.run()
    assert h.of(j)[0] == Started(j, 3, 0)
    assert h.tokens(j) == [4, 5, 6, 7, 8]
    assert h.end(j) == Finished(j, FinishReason.LENGTH, 5)


def test_a_new_request_joins_the_running_batch_at_the_next_step():
    h = Harness(n_slots=4)
    a = h.submit([1], max_tokens=40)
    for _ in range(5):
        h.step()
    b = h.submit([10, 11], max_tokens=3)
    plan = h.step()  # b's prompt is evaluated alongside a's decode
    assert plan.chunk == (1, [10, 11]) and [s for s, _ in plan.decodes] == [0]
    assert Started(b, 2, 0) in h.events and not isinstance(h.end(a), Finished)
    plan = h.step()
    assert sorted(s for s, _ in plan.decodes) == [0, 1]
    h.run()
    assert h.tokens(a) == chain([1], 40) and h.tokens(b) == [12, 13, 14]


def test_more_sequences_than_slots_queue_fifo_and_start_as_slots_free():
    h = Harness(n_slots=2)
    jobs = [h.submit([i], max_tokens=m) for i, m in zip(range(6), [3, 8, 2, 5, 1, 4])]
    started_at, finished_at, step = {}, {}, 0
    while not h.sched.idle:
        plan = h.step()
        step += 1
        assert h.sched.running <= 2
        assert plan.chunk is None or len(plan.decodes) + 1 <= 2
        for e in h.events:
            if isinstance(e, Started):
                started_at.setdefault(e.job_id, step)
            if isinstance(e, Finished):
                finished_at.setdefault(e.job_id, step)
    assert sorted(jobs, key=lambda j: (started_at[j], j)) == jobs  # FIFO
    for j, prompt in zip(jobs, range(6)):
        assert h.tokens(j) == chain([prompt], [3, 8, 2, 5, 1, 4][prompt])
    # job 3 takes the slot job 1 frees, starting one step later (its prompt is one chunk)
    assert started_at[jobs[2]] == finished_at[jobs[0]] + 1


def test_cancel_frees_the_slot_at_once():
    h = Harness(n_slots=1)
    a = h.submit([1], max_tokens=30)
    b = h.submit([5], max_tokens=2)
    c = h.submit([7], max_tokens=2)
    for _ in range(4):
        h.step()
    assert h.sched.cancel(c)  # queued: ends without starting
    assert h.of(c) == [Finished(c, FinishReason.CANCELLED, 0)]
    assert h.sched.cancel(a)
    assert h.end(a) == Finished(a, FinishReason.CANCELLED, 4) and h.sched.running == 0
    plan = h.step()
    assert plan.chunk == (0, [5]) and not plan.decodes
    h.run()
    assert h.tokens(b) == [6, 7] and not h.sched.cancel(a)


def test_cancel_between_plan_and_apply_drops_the_row():
    h = Harness(n_slots=2)
    a, b = h.submit([1], max_tokens=10), h.submit([20], max_tokens=10)
    h.step(), h.step(), h.step()
    plan = h.sched.plan_step()
    h.sched.cancel(a)
    h.sched.apply(run_plan(h.core, plan))
    assert len(h.tokens(a)) == 3 and h.end(a).reason == FinishReason.CANCELLED
    h.run()
    assert h.tokens(b) == chain([20], 10)


def test_a_long_prompt_is_prefilled_one_chunk_per_step_while_others_decode():
    h = Harness(n_slots=2, chunk=4)
    a = h.submit([1], max_tokens=30)
    h.step()
    long = list(range(20, 38))  # 18 tokens: chunks of 4, 4, 4, 4, 2
    b = h.submit(long, max_tokens=3)
    chunks = []
    for _ in range(5):
        plan = h.step()
        assert [s for s, _ in plan.decodes] == [0]  # a decodes every step
        chunks.append(plan.chunk[1])
    assert chunks == [long[0:4], long[4:8], long[8:12], long[12:16], long[16:18]]
    assert Started(b, 18, 0) in h.events and len(h.tokens(a)) == 6
    h.run()
    assert h.tokens(b) == [38, 39, 40]


def test_prefix_reuse_picks_the_slot_holding_the_prefix_and_prefills_the_suffix():
    h = Harness(n_slots=3, chunk=4)
    p1, p2 = [1, 2, 3, 4, 5, 6], [30, 31, 32]
    h.submit(p1, max_tokens=3), h.submit(p2, max_tokens=3)
    h.run()
    slot1 = next(s for s, t in enumerate(h.core.cache) if t[:6] == p1)
    assert h.core.cache[slot1] == p1 + [7, 8]  # the last generated token is never evaluated
    turn2 = p1 + [7, 8, 9, 40, 41]  # next turn of the first conversation
    j3 = h.submit(turn2, max_tokens=2)
    plan = h.step()
    assert plan.resets == [(slot1, 8)] and plan.chunk == (slot1, [9, 40, 41])
    assert h.of(j3)[0] == Started(j3, 11, 8)
    h.run()
    assert h.tokens(j3) == [42, 43]
    same = h.submit(p2, max_tokens=1)  # identical prompt: its last token is evaluated again for logits
    plan = h.step()
    assert plan.chunk[1] == [32] and h.of(same)[0] == Started(same, 3, 2)
    fresh = h.submit([45, 46], max_tokens=1, reuse_prefix=False)
    plan = h.step()
    assert plan.resets[0][1] == 0 and h.of(fresh)[0] == Started(fresh, 2, 0)


def test_a_shared_prefix_beats_recency_and_the_least_recently_used_slot_wins_ties():
    h = Harness(n_slots=3)
    for p in ([1], [2], [3]):  # used in order: slot 0, 1, 2
        h.submit(p, max_tokens=1)
        h.run()
    assert [c[:1] for c in h.core.cache] == [[1], [2], [3]]
    h.submit([3, 5], max_tokens=1)  # slot 2 holds its first token, though it was used last
    assert h.step().chunk == (2, [5])
    h.submit([10], max_tokens=1)  # no shared prefix: the least recently used slot
    assert h.step().chunk[0] == 0
    h.submit([11], max_tokens=1)
    assert h.step().chunk[0] == 1


def test_finish_reasons_and_counts():
    h = Harness(n_ctx=16, eos=9)
    length = h.submit([1], max_tokens=4)
    stop = h.submit([5], max_tokens=10)  # 6, 7, 8, then EOS (not emitted, not counted)
    ctx = h.submit([20, 21, 22, 23, 24], max_tokens=None)  # up to the context: 11 tokens
    zero = h.submit([30], max_tokens=0)
    too_long = h.submit(list(range(10, 20)), max_tokens=7)
    full = h.submit(list(range(10, 26)), max_tokens=None)
    empty = h.submit([], max_tokens=1)
    bad = h.submit([V + 3], max_tokens=1)
    h.run()
    assert h.end(length) == Finished(length, FinishReason.LENGTH, 4)
    assert h.tokens(stop) == [6, 7, 8] and h.end(stop) == Finished(stop, FinishReason.STOP, 3)
    assert h.tokens(ctx) == list(range(25, 36)) and h.end(ctx) == Finished(ctx, FinishReason.LENGTH, 11)
    assert h.of(zero) == [Started(zero, 1, 0), Finished(zero, FinishReason.LENGTH, 0)]
    for j in (too_long, full):
        assert len(h.of(j)) == 1 and h.end(j).kind == ErrorKind.CONTEXT_LENGTH
    for j in (empty, bad):
        assert len(h.of(j)) == 1 and h.end(j).kind == ErrorKind.INVALID_REQUEST


def test_time_limit_ends_as_length_timed_out():
    now = [0.0]
    h = Harness(clock=lambda: now[0])
    j = h.submit([1], max_tokens=40, time_limit=2.0)
    for _ in range(4):
        h.step()
    now[0] = 2.5
    h.step()
    assert h.end(j) == Finished(j, FinishReason.LENGTH, 4, timed_out=True)


def test_non_finite_logits_fail_the_sequence_and_forget_the_slot():
    h = Harness(n_slots=1)
    j = h.submit([1, 2], max_tokens=3)
    plan = h.sched.plan_step()
    rows, last = run_plan(h.core, plan)
    h.sched.apply((rows, last * np.nan))
    # Started first (the prompt was evaluated), then the failure: a stream ends with an error event, as with
    # ctransformers, rather than an HTTP error
    assert h.of(j) == [Started(j, 2, 0), Failed(j, ErrorKind.INTERNAL, h.end(j).message)] and h.sched.idle
    k = h.submit([1, 2, 3], max_tokens=1)
    assert h.step().resets == [(0, 0)]
    h.run()
    assert h.tokens(k) == [4]


def test_a_sampler_error_fails_only_its_sequence():
    def choose(row, seq):
        if seq.job.job_id == 1 and len(seq.generated) == 2:
            raise ValueError("bad sampling parameters")
        return int(np.argmax(row))

    h = Harness(n_slots=2)
    h.sched.choose = choose
    a, b = h.submit([1], max_tokens=5), h.submit([20, 20, 20], max_tokens=5)
    h.run()
    assert h.end(a) == Failed(a, ErrorKind.INTERNAL, "bad sampling parameters") and h.tokens(a) == [2, 3]
    assert h.tokens(b) == [21, 22, 23, 24, 25] and h.sched.slots[0].seq is None
    assert h.sched.sequences == {}
    h.submit([1, 1], max_tokens=1)
    assert h.step() is not None


ops = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.lists(st.integers(0, 5), min_size=1, max_size=12), st.integers(0, 8),
              st.booleans()),
    st.tuples(st.just("cancel"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 4)),
), max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, n_slots=st.integers(1, 4), chunk=st.integers(1, 5))
def test_random_arrivals_and_cancels_keep_every_sequence_accounted_for(ops, n_slots, chunk):
    h = Harness(n_slots=n_slots, n_ctx=24, chunk=chunk)
    submitted, cancelled, asked = [], set(), {}

    def check():
        held = [s.seq for s in h.sched.slots if s.seq is not None]
        assert len(held) == len(set(map(id, held)))  # one sequence per slot, one slot per sequence
        places = held + list(h.sched.waiting)
        assert len(places) == len(h.sched.sequences) == len({id(s) for s in places})

    for op in ops:
        if op[0] == "submit":
            submitted.append(h.submit(op[1], max_tokens=op[2], reuse_prefix=op[3]))
            asked[submitted[-1]] = (op[1], op[2])
        elif op[0] == "cancel":
            if h.sched.cancel(op[1]):
                cancelled.add(op[1])
        else:
            for _ in range(op[1]):
                h.step()
                check()
        check()
    h.run()
    for j in submitted:
        evs = h.of(j)
        kinds = [type(e).__name__ for e in evs]
        assert kinds.count("Finished") + kinds.count("Failed") == 1 and kinds[-1] in ("Finished", "Failed")
        assert kinds.count("Started") <= 1 and (kinds.count("Started") == 1 or j in cancelled or
                                                kinds[-1] == "Failed")
        if "Started" in kinds:
            assert kinds[0] == "Started"
        else:
            assert "Tokens" not in kinds
        end = evs[-1]
        if isinstance(end, Finished):
            assert end.completion_tokens == len(h.tokens(j))
        if j not in cancelled:  # greedy output as if run alone
            prompt, max_tokens = asked[j]
            assert end == Finished(j, FinishReason.LENGTH, max_tokens) and h.tokens(j) == chain(prompt, max_tokens)


def test_real_core_greedy_through_the_scheduler_equals_each_prompt_alone(tmp_path):
    from backends.batched import BatchedEngine, EngineConfig
    from tests.models import write_successor

    prompts = [list(p.encode()) for p in ["x", "abc", "0123", "\n", "hello wor", "7", "zzzzzzzzzzzzzzzzzm",
                                          "The quick brown fox jumps over the lazy dog: a"]]
    max_new = 20
    path = write_successor(tmp_path / "succ.bin", ftype="q8_0")
    with BatchedEngine(str(path), EngineConfig(n_slots=3, threads=1)) as eng:
        def alone(prompt):
            out, logits = [], eng.prefill(0, prompt)
            while len(out) < max_new:
                tok = int(np.argmax(logits))
                if tok == eng.eos_token_id:
                    break
                out.append(tok)
                logits = eng.decode([(0, tok)])[0]
            return out

        want = [alone(p) for p in prompts]
        assert len({len(w) for w in want}) > 2  # some stop at EOS, some at max_tokens
        events = []
        sched = Scheduler(eng.n_slots, eng.n_ctx, eng.eos_token_id, argmax, events.append, chunk=8,
                          n_vocab=eng.n_vocab)

        def submit(i, prompt):
            sched.submit(GenerationJob(i, prompt, max_new, SamplingParams(temperature=0.0)))

        def step():
            plan = sched.plan_step()
            sched.apply(run_plan(eng, plan))

        for i in range(4):  # more than the slots: one waits
            submit(i, prompts[i])
        step(), step()
        submit(99, prompts[7])
        step()
        sched.cancel(99)  # cancelled mid-prefill
        for i in range(4, len(prompts)):  # arrive while others run
            submit(i, prompts[i])
            step()
        while not sched.idle:
            step()
        got = {i: [t for e in events if isinstance(e, Tokens) and e.job_id == i for t in e.ids]
               for i in range(len(prompts))}
        assert [got[i] for i in range(len(prompts))] == want
        turn2 = prompts[6] + want[6] + list(b"abc")  # a conversation's next turn reuses its slot's cache
        submit(100, turn2)
        while not sched.idle:
            step()
        started = next(e for e in events if isinstance(e, Started) and e.job_id == 100)
        assert len(want[6]) < max_new  # it stopped at EOS: its last token was evaluated, so all is cached
        assert started.cached_tokens == len(prompts[6]) + len(want[6])
        assert [t for e in events if isinstance(e, Tokens) and e.job_id == 100 for t in e.ids] == alone(turn2)


def test_a_long_chunk_is_trimmed_so_decodes_and_chunk_fill_whole_row_tiles():
    """chunk 32 beside 8 decodes: 24 prompt tokens (32 rows); alone: 32; beside 15: 17; a chunk of at most
    one tile is never trimmed."""
    h = Harness(n_slots=4, chunk=32)
    assert [h.sched.chunk_size(d) for d in (0, 1, 8, 15, 16, 17)] == [32, 31, 24, 17, 32, 31]
    assert [Harness(chunk=16).sched.chunk_size(d) for d in (0, 3, 8)] == [16, 16, 16]
    h = Harness(n_slots=2, n_ctx=128, chunk=32)
    first = h.submit([1, 2], max_tokens=50)
    h.step()  # the short prompt, alone
    second = h.submit([1 + i % 40 for i in range(60)], max_tokens=1)
    plan = h.sched.plan_step()
    assert len(plan.decodes) == 1 and plan.chunk is not None and len(plan.chunk[1]) == 31, plan
    rows, last = run_plan(h.core, plan)
    h.sched.apply((rows, last))
    h.run()
    assert h.end(first) is not None and h.end(second) is not None
