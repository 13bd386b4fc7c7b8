"""The scheduler with embedding and generation jobs mixed at random, cancels at any moment (a fake core).

Invariants checked after every step: one terminal event per job and nothing after it, the core's cache equals
the scheduler's view of every slot, no step evaluates more than chunk + n_slots tokens, each vector is its
input's alone, each generation's tokens are its tokens alone, and once everything ended every slot is free.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from backends.batched.scheduler import run_plan
from backends.types import Embedding, Failed, Finished, FinishReason, Tokens
from tests.batched.test_embeddings_scheduler import Harness, V, expected


def generated_alone(prompt: list[int], max_tokens: int, n_ctx: int) -> list[int]:
    """The fake core's greedy tokens (last + 1) until EOS (V - 1), max_tokens or the context."""
    out, last = [], prompt[-1]
    budget = min(max_tokens, n_ctx - len(prompt))
    while len(out) < budget:
        last = (last + 1) % V
        if last == V - 1:
            break
        out.append(last)
    return out


def _check_step(h: Harness, plan, n_slots: int, chunk: int) -> None:
    tokens = len(plan.decodes) + (len(plan.chunk[1]) if plan.chunk else 0) + sum(len(p) for _, p in plan.pooled)
    assert tokens <= chunk + n_slots
    for slot in h.sched.slots:
        assert h.core.cache[slot.index] == slot.tokens


@pytest.mark.parametrize("seed", range(12))
def test_random_mixes_of_embeddings_generations_and_cancels_keep_every_invariant(seed):
    rnd = random.Random(seed)
    n_slots, n_ctx, chunk = rnd.choice([(1, 24, 4), (2, 32, 4), (3, 40, 8), (4, 48, 5)])
    h = Harness(n_slots=n_slots, n_ctx=n_ctx, chunk=chunk)
    jobs: dict[int, tuple] = {}
    cancelled: set[int] = set()
    for _ in range(400):
        roll = rnd.random()
        if roll < 0.25 and len(jobs) < 60:
            prompt = [rnd.randrange(V - 1) for _ in range(rnd.randint(1, n_ctx // 2))]
            embed = rnd.random() < 0.6
            max_tokens = rnd.randint(1, 6)
            jobs[h.submit(prompt, embed=embed, max_tokens=max_tokens)] = (prompt, embed, max_tokens)
        elif roll < 0.32 and h.sched.sequences:
            job_id = rnd.choice(sorted(h.sched.sequences))
            cancelled.add(job_id)
            h.sched.cancel(job_id)
        plan = h.sched.plan_step()
        if plan is None:
            continue
        if rnd.random() < 0.1 and h.sched.sequences:  # a cancel between plan and apply
            job_id = rnd.choice(sorted(h.sched.sequences))
            cancelled.add(job_id)
            h.sched.cancel(job_id)
        h.sched.apply(run_plan(h.core, plan))
        _check_step(h, plan, n_slots, chunk)
    h.run()
    assert h.sched.idle and h.sched.running == 0 and h.sched.queued == 0
    assert all(slot.seq is None for slot in h.sched.slots)
    for job_id, (prompt, embed, max_tokens) in jobs.items():
        events = h.of(job_id)
        ends = [i for i, e in enumerate(events) if isinstance(e, (Finished, Failed))]
        assert ends == [len(events) - 1], events  # exactly one end, and it is the last event
        end = events[-1]
        assert not isinstance(end, Failed), end
        if end.reason == FinishReason.CANCELLED:
            assert job_id in cancelled
            assert not any(isinstance(e, Embedding) for e in events)
            continue
        if embed:
            assert np.allclose(h.vector(job_id), expected(prompt), atol=1e-6)
        else:
            got = [t for e in events if isinstance(e, Tokens) for t in e.ids]
            assert got == generated_alone(prompt, max_tokens, n_ctx)
