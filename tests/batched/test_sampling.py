"""The batched engine's per-sequence sampler (backends/batched/sampling.py): pure numpy, fast, no ggml needed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.batched.sampling import NON_FINITE, Row, sample_batch, sample_row
from backends.types import SamplingParams

V = 64
PIECES = [f"<{i}>".encode() for i in range(V)]


def logits_of(seed: int, n: int = V, scale: float = 2.0) -> np.ndarray:
    """Distinct random float32 logits."""
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def pick(logits, params: SamplingParams, tokens=(), counts=None, step: int = 0, pieces=PIECES) -> int:
    """The token chosen for one row (fails the test on a row error)."""
    out = sample_row(np.asarray(logits, dtype=np.float32), Row(params, tokens, counts or {}, step), pieces)
    assert out.error is None, out.error
    return out.token


def test_the_draw_is_libstdcxx_generate_canonical_on_std_mt19937():
    from backends.batched.sampling import mt19937_canonical

    # std::mt19937(5489) (the default seed) first outputs 3499211612, 581869302
    assert mt19937_canonical(5489) == (3499211612 + 581869302 * 2.0**32) / 2.0**64
    assert mt19937_canonical(0) == (2357136044 + 2546248239 * 2.0**32) / 2.0**64


def test_greedy_is_argmax_and_ignores_the_seed():
    for s in range(20):
        lg = logits_of(s)
        for seed in (0, 7, 123456):
            assert pick(lg, SamplingParams(temperature=0.0, seed=seed), step=s) == int(np.argmax(lg))


def test_top_k_1_and_tiny_top_p_equal_greedy():
    for s in range(20):
        lg = logits_of(s)
        best = int(np.argmax(lg))
        assert pick(lg, SamplingParams(temperature=1.5, top_k=1, seed=s), step=s) == best
        assert pick(lg, SamplingParams(temperature=1.0, top_p=1e-6, seed=s), step=s) == best
        assert pick(lg, SamplingParams(temperature=1e-300, seed=s), step=s) == best  # 0 as a float32


def test_logit_bias_excludes_and_forces():
    lg = logits_of(3)
    order = np.argsort(-lg)
    best, second, worst = int(order[0]), int(order[1]), int(order[-1])
    assert pick(lg, SamplingParams(temperature=0.0, logit_bias={best: -100.0})) == second
    for step in range(50):
        assert pick(lg, SamplingParams(temperature=1.0, logit_bias={worst: 100.0}, seed=1), step=step) == worst
        assert pick(lg, SamplingParams(temperature=1.0, top_k=2, logit_bias={best: -100.0}), step=step) != best
    assert pick(lg, SamplingParams(temperature=0.0, logit_bias={V + 5: 100.0, -1: 100.0})) == best  # out of range


def test_openai_penalties_move_greedy_to_the_runner_up():
    lg = np.zeros(V, dtype=np.float32)
    lg[[10, 11]] = [3.0, 2.5]
    assert pick(lg, SamplingParams(temperature=0.0)) == 10
    assert pick(lg, SamplingParams(temperature=0.0, frequency_penalty=0.2), counts={10: 3}) == 11
    assert pick(lg, SamplingParams(temperature=0.0, frequency_penalty=0.2), counts={10: 2}) == 10
    assert pick(lg, SamplingParams(temperature=0.0, presence_penalty=0.6), counts={10: 1}) == 11
    assert pick(lg, SamplingParams(temperature=0.0, presence_penalty=0.6), counts={11: 1}) == 10


def test_repetition_penalty_divides_positive_multiplies_negative_within_the_window():
    lg = np.full(V, -50.0, dtype=np.float32)
    lg[[10, 11]] = [3.0, 2.5]
    rp = SamplingParams(temperature=0.0, repetition_penalty=1.3, last_n_tokens=4)
    assert pick(lg, rp, tokens=[1, 2, 10]) == 11  # 3.0 / 1.3 < 2.5
    assert pick(lg, rp, tokens=[10, 1, 2, 3, 4]) == 10  # 10 is outside the last 4 tokens
    assert pick(lg, SamplingParams(temperature=0.0, repetition_penalty=1.1, last_n_tokens=4), tokens=[10]) == 10
    neg = np.full(V, -50.0, dtype=np.float32)
    neg[[10, 11]] = [-1.0, -1.2]
    assert pick(neg, rp, tokens=[10]) == 11  # -1.0 * 1.3 < -1.2
    assert pick(neg, SamplingParams(temperature=0.0, repetition_penalty=1.3, last_n_tokens=0), tokens=[10]) == 10


def mixed_params(i: int) -> SamplingParams:
    """Varied parameters for filler rows."""
    return SamplingParams(temperature=[0.0, 0.5, 1.2, 0.9][i % 4], top_p=[1.0, 0.8, 0.3][i % 3],
                          top_k=[0, 5, 40][i % 3], repetition_penalty=[1.0, 1.2][i % 2], seed=1000 + i)


@given(seed=st.integers(0, 2**31 - 1), step=st.integers(0, 10_000), pos=st.integers(0, 7),
       temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.5]), top_p=st.sampled_from([1.0, 0.95, 0.5]),
       top_k=st.sampled_from([0, 1, 3, 40]), lseed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_a_row_samples_the_same_alone_and_inside_a_batch(seed, step, pos, temperature, top_p, top_k, lseed):
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=1.1, seed=seed,
                            frequency_penalty=0.3, logit_bias={3: 2.0})
    row = Row(params, [1, 2, 3, 4], {2: 1}, step, logprobs=3)
    logits = np.stack([logits_of(lseed + i) for i in range(8)])
    rows = [Row(mixed_params(i), [i], {i: 2}, step + i, logprobs=i if i % 2 else None) for i in range(8)]
    rows[pos] = row
    alone = sample_row(logits[pos], row, PIECES)
    assert sample_batch(logits, rows, PIECES)[pos] == alone


def test_different_seeds_draw_differently_and_each_seed_is_reproducible():
    lg = logits_of(5, scale=0.5)  # a flat distribution: draws vary a lot
    draws = {seed: [pick(lg, SamplingParams(seed=seed), step=s) for s in range(50)] for seed in (1, 2, 3)}
    assert draws[1] != draws[2] != draws[3] != draws[1]
    assert draws[1] == [pick(lg, SamplingParams(seed=1), step=s) for s in range(50)]
    assert len(set(draws[1])) > 10  # steps differ too


def test_sampled_frequencies_match_the_softmax():
    lg = np.array([1.0, 0.5, 0.0, -0.5, -1.5], dtype=np.float32)
    p = np.exp(lg - lg.max())
    p /= p.sum()
    n = 20_000
    tokens = [pick(lg, SamplingParams(temperature=1.0, seed=s // 100), step=s % 100, pieces=PIECES[:5])
              for s in range(n)]
    observed = np.bincount(tokens, minlength=5)
    chi2 = float(((observed - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 30.0, (observed, n * p)  # 4 degrees of freedom: p < 1e-5; deterministic seeds


def test_temperature_and_top_p_cut_the_tail():
    lg = np.log(np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32))
    seen = {pick(lg, SamplingParams(top_p=0.6, seed=9), step=s, pieces=PIECES[:4]) for s in range(300)}
    assert seen == {0, 1}  # 0.4 + 0.3 >= 0.6
    cold = [pick(lg, SamplingParams(temperature=0.05, seed=9), step=s, pieces=PIECES[:4]) for s in range(300)]
    assert set(cold) == {0}


def test_logprobs_come_from_the_raw_logits_normalised_and_best_first():
    lg = logits_of(11)
    params = SamplingParams(temperature=0.7, top_k=5, logit_bias={0: 50.0}, frequency_penalty=1.0, seed=4)
    out = sample_row(lg, Row(params, [], {1: 3}, 2, logprobs=V), PIECES)
    assert out.token == 0  # forced by the bias, but reported as the model saw it
    raw = lg.astype(np.float64)
    logz = raw.max() + np.log(np.exp(raw - raw.max()).sum())
    assert out.logprob.logprob == pytest.approx(raw[0] - logz, abs=1e-9)
    vals = [v for _, v in out.logprob.top]
    assert np.exp(vals).sum() == pytest.approx(1.0, abs=1e-9)
    assert vals == sorted(vals, reverse=True)
    assert [piece for piece, _ in out.logprob.top] == [PIECES[i] for i in np.argsort(-raw, kind="stable")]
    short = sample_row(lg, Row(SamplingParams(temperature=0.0), logprobs=3), PIECES)
    assert len(short.logprob.top) == 3 and short.logprob.top[0] == (PIECES[short.token], short.logprob.logprob)
    assert sample_row(lg, Row(SamplingParams(), logprobs=0), PIECES).logprob.top == []
    assert sample_row(lg, Row(SamplingParams()), PIECES).logprob is None


def test_a_non_finite_row_errors_alone():
    logits = np.stack([logits_of(i) for i in range(4)])
    logits[1, 7] = np.nan
    logits[3, 2] = np.inf
    rows = [Row(SamplingParams(temperature=0.0), logprobs=2) for _ in range(4)]
    out = sample_batch(logits, rows, PIECES)
    assert [o.error for o in out] == [None, NON_FINITE, None, NON_FINITE]
    assert out[0].token == int(np.argmax(logits[0])) and out[2].token == int(np.argmax(logits[2]))
    assert out[2].logprob is not None and out[1].token == -1
    with pytest.raises(ValueError):
        sample_batch(logits, rows[:3], PIECES)


def test_matches_ctransformers_sampler_token_for_token(tmp_path):
    """Same logits, parameters and seed: the same token as backends.engine (distinct logits; ties may differ)."""
    from backends.engine import Engine, shape_logits
    from tests.models import write_random

    eng = Engine(str(write_random(tmp_path / "m.bin", ftype="f32")), threads=1)
    eng.prefill([1, 2, 3])
    n_vocab = eng.n_vocab
    rng = np.random.default_rng(0)
    for _ in range(300):
        logits = (rng.standard_normal(n_vocab) * rng.choice([0.5, 2.0, 5.0])).astype(np.float32)
        params = SamplingParams(
            temperature=float(rng.choice([0.0, 0.3, 0.7, 1.0, 1.3])), top_p=float(rng.choice([1.0, 0.9, 0.5, 0.05])),
            top_k=int(rng.choice([0, 1, 5, 40, 600])), repetition_penalty=float(rng.choice([1.0, 1.1, 1.3])),
            last_n_tokens=int(rng.choice([0, 8, 64])), frequency_penalty=float(rng.choice([0.0, 0.5])),
            presence_penalty=float(rng.choice([0.0, 0.7])), seed=int(rng.integers(0, 2**31)),
            logit_bias={int(rng.integers(n_vocab)): float(rng.choice([-100.0, 5.0, 100.0]))})
        context = [int(t) for t in rng.integers(0, n_vocab, 40)]
        counts: dict[int, int] = {}
        for t in context[-10:]:
            counts[t] = counts.get(t, 0) + 1
        step = int(rng.integers(0, 100))
        ours = sample_row(logits, Row(params, context, counts, step), eng.pieces).token
        eng.logits()[:] = logits
        shape_logits(eng.logits(), params, counts)
        eng.context = list(context)
        assert eng.sample(params, step) == ours, params


def reference(logits: np.ndarray, params: SamplingParams, tokens, counts, step: int) -> int:
    """A slow, direct statement of the sampler (stable sort: equal logits in id order)."""
    from backends.batched.sampling import discrete_index, mt19937_canonical, step_seed

    x = np.array(logits, dtype=np.float32)
    for t, c in counts.items():
        x[t] -= c * params.frequency_penalty + params.presence_penalty
    for t, b in params.logit_bias.items():
        x[t] += b
    top_k = 1 if params.greedy else (params.top_k if 0 < params.top_k <= x.size else x.size)
    x = x.astype(np.float64) * (1.0 / (1.0 if params.greedy else float(np.float32(params.temperature))))
    rp = float(np.float32(params.repetition_penalty))
    for t in set(tokens[-params.last_n_tokens:] if params.last_n_tokens else []):
        x[t] = x[t] * rp if x[t] <= 0 else x[t] / rp
    ids = sorted(range(x.size), key=lambda i: (-x[i], i))[:top_k]
    e = np.exp(x[ids] - x[ids[0]])
    probs = e / np.cumsum(e)[-1]
    if np.float32(params.top_p) < 1.0:
        cum = np.cumsum(probs)
        keep = next((i + 1 for i, c in enumerate(cum) if c >= np.float32(params.top_p)), probs.size)
        probs = probs[:keep] * (1.0 / cum[keep - 1])
    return ids[discrete_index(probs, mt19937_canonical(step_seed(params.seed, step)))]


@given(values=st.lists(st.integers(-3, 3), min_size=2, max_size=30), seed=st.integers(0, 2**31 - 1),
       step=st.integers(0, 999), temperature=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
       top_p=st.sampled_from([1.0, 0.9, 0.6, 0.2]), top_k=st.integers(0, 8),
       repetition_penalty=st.sampled_from([1.0, 1.5]), data=st.data())
@settings(max_examples=300, deadline=None)
def test_matches_a_direct_reference_even_with_tied_logits(values, seed, step, temperature, top_p, top_k,
                                                          repetition_penalty, data):
    n = len(values)
    logits = np.array(values, dtype=np.float32)
    tokens = data.draw(st.lists(st.integers(0, n - 1), max_size=6))
    counts = data.draw(st.dictionaries(st.integers(0, n - 1), st.integers(1, 3), max_size=3))
    bias = data.draw(st.dictionaries(st.integers(0, n - 1), st.sampled_from([-100.0, 1.0, 100.0]), max_size=2))
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                            last_n_tokens=4, frequency_penalty=0.5, presence_penalty=0.25, logit_bias=bias, seed=seed)
    pieces = [b"x"] * n
    assert pick(logits, params, tokens, counts, step, pieces) == reference(logits, params, tokens, counts, step)
