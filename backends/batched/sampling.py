"""Per-sequence sampling of batched logits in numpy, reproducing ctransformers' GPT-J sampler.

Order (as backends/engine.py + ctransformers 0.2.27 `gpt_sample_top_k_top_p`): logprobs from the raw
logits; OpenAI frequency/presence penalties then logit_bias on a float32 copy; a grammar's mask (-inf,
top_k capped at the allowed count); scale by 1/temperature;
repetition penalty (x <= 0: multiply, else divide) over the set of the last `last_n_tokens` tokens;
top_k; softmax (float64); top_p (nucleus, at least one kept, renormalised); a draw from std::mt19937
seeded with step_seed(seed, step) through libstdc++'s discrete_distribution. Greedy (temperature 0 or
top_k 1) is top_k=1 at temperature 1, still after the penalties. Each row owns its RNG, so a row gives
the same token alone or in any batch. Ties are broken by the lower token id (ctransformers' heap order
is unspecified for equal logits).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from backends.types import SamplingParams, TokenLogprob

_local = threading.local()  # one RandomState per thread, reseeded per draw (constructing one costs ~0.1 ms)
NON_FINITE = ("the model produced non-finite logits (NaN or infinity): its weights are probably corrupt; "
              "check or re-download the model file")


def step_seed(seed: int, step: int) -> int:
    """Per-token seed, identical to backends.engine.step_seed (kept here so this module needs only numpy)."""
    return (seed * 1_000_003 + step * 7_919) & 0x7FFFFFFF


@dataclass(frozen=True)
class Row:
    """One sequence's sampling inputs for this step."""

    params: SamplingParams
    tokens: Sequence[int] = ()  # the sequence so far (prompt + generated); the last last_n_tokens are used
    counts: Mapping[int, int] = field(default_factory=dict)  # generated-token counts (OpenAI penalties)
    step: int = 0  # tokens generated so far (the RNG is reseeded per step)
    logprobs: int | None = None  # top alternatives to report; None = no logprobs
    allowed: np.ndarray | None = None  # grammar mask [n_vocab] (bool): other tokens are never sampled


@dataclass(frozen=True)
class Sampled:
    """One row's outcome: a token (and its logprob), or an error message."""

    token: int = -1
    logprob: TokenLogprob | None = None
    error: str | None = None


def mt19937_canonical(seed: int) -> float:
    """std::generate_canonical<double, 53>(std::mt19937(seed)) as libstdc++ computes it."""
    rs = getattr(_local, "rs", None)
    if rs is None:
        rs = _local.rs = np.random.RandomState(0)
    rs.seed(int(seed))  # init_genrand(seed), as std::mt19937(seed); RandomState's stream is frozen (NEP 19)
    lo, hi = (float(x) for x in rs.randint(0, 2**32, size=2, dtype=np.uint64))  # two raw 32-bit outputs
    u = (lo + hi * 4294967296.0) / 18446744073709551616.0
    return u if u < 1.0 else float(np.nextafter(1.0, 0.0))


def discrete_index(probs: np.ndarray, u: float) -> int:
    """libstdc++ std::discrete_distribution over probs for a canonical draw u."""
    if probs.size < 2:
        return 0
    total = np.cumsum(probs)[-1]  # std::accumulate: sequential
    cp = np.cumsum(probs / total)
    cp[-1] = 1.0
    return int(np.searchsorted(cp, u, side="left"))


def shape(logits: np.ndarray, params: SamplingParams, counts: Mapping[int, int]) -> np.ndarray:
    """Frequency/presence penalties then logit_bias on a float32 copy (float32 steps like shape_logits)."""
    out = np.array(logits, dtype=np.float32)
    if counts and (params.frequency_penalty or params.presence_penalty):
        ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        n = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
        out[ids] -= (n * params.frequency_penalty + params.presence_penalty).astype(np.float32)
    bias = {t: b for t, b in params.logit_bias.items() if 0 <= t < out.size}
    if bias:
        ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        out[ids] += np.fromiter(bias.values(), dtype=np.float64, count=len(bias)).astype(np.float32)
    return out


def candidates(shaped: np.ndarray, row: Row) -> tuple[np.ndarray, np.ndarray]:
    """Grammar mask, temperature scaling, repetition penalty and top_k: (ids, scaled logits), best first."""
    p, n_vocab = row.params, shaped.size
    greedy = p.greedy or np.float32(p.temperature) == 0  # below float32's range ctransformers divides by 0
    top_k = 1 if greedy else (p.top_k if 0 < p.top_k <= n_vocab else n_vocab)
    if row.allowed is not None:  # as backends.engine: disallowed logits are -inf and never candidates
        n_allowed = int(np.count_nonzero(row.allowed))
        if not n_allowed:
            raise ValueError("the grammar allows no token here")
        top_k = min(top_k, n_allowed)
    temp = 1.0 if greedy else float(np.float32(p.temperature))  # passed to C as float, used as double
    x = shaped.astype(np.float64) * (1.0 / temp)
    if row.allowed is not None:
        x[~row.allowed] = -np.inf
    if p.repetition_penalty != 1.0 and p.last_n_tokens > 0 and len(row.tokens):
        recent = np.unique(np.asarray(row.tokens[-p.last_n_tokens:], dtype=np.int64))
        recent = recent[(recent >= 0) & (recent < n_vocab)]
        penalty = float(np.float32(p.repetition_penalty))
        vals = x[recent]
        x[recent] = np.where(vals <= 0, vals * penalty, vals / penalty)
    if top_k == 1:
        ids = np.array([int(np.argmax(x))])  # the first maximum, as C++'s partial_sort for one element
    else:  # an unstable sort: choose() puts equal logits in id order
        ids = np.arange(n_vocab)
        if top_k < n_vocab:
            ids = np.argpartition(-x, top_k - 1)[:top_k]
            last = x[ids].min()  # logits equal to the k-th: keep the lowest ids among them
            above = ids[x[ids] > last]
            ids = np.concatenate((above, np.flatnonzero(x == last)[: top_k - above.size]))
        ids = ids[np.argsort(-x[ids])]
    return ids, x[ids]


def choose(ids: np.ndarray, scaled: np.ndarray, row: Row) -> int:
    """Softmax, top_p and the seeded draw over best-first candidates."""
    if ids.size == 1:
        return int(ids[0])
    e = np.exp(scaled - scaled[0])
    probs = e / np.cumsum(e)[-1]
    top_p = float(np.float32(row.params.top_p))
    if top_p < 1.0:
        cum = np.cumsum(probs)
        reached = cum >= top_p
        keep = int(np.argmax(reached)) + 1 if reached.any() else probs.size  # the first reaching top_p
        probs = probs[:keep] * (1.0 / cum[keep - 1])
    u = mt19937_canonical(step_seed(row.params.seed, row.step))
    idx = discrete_index(probs, u)
    run = np.flatnonzero(scaled == scaled[idx])  # equal logits: the cumulative sums do not depend on
    if run.size > 1:  # their order, so order the run by id and take the same position in it
        return int(np.sort(ids[run])[idx - run[0]])
    return int(ids[idx])


def log_normalisers(raw: np.ndarray) -> np.ndarray:
    """Per-row log-sum-exp of the raw logits in float64 (as backends.engine.top_logprobs)."""
    peak = raw.max(axis=1, keepdims=True)
    return peak[:, 0] + np.log(np.exp(raw - peak).sum(axis=1))


def top_ids(raw_row: np.ndarray, k: int) -> np.ndarray:
    """The k largest raw logits' ids, best first (ties: as backends.engine.top_logprobs)."""
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    k = min(k, raw_row.size)
    ids = np.argpartition(-raw_row, k - 1)[:k]
    return ids[np.argsort(-raw_row[ids], kind="stable")]


def sample_row(logits: np.ndarray, row: Row, pieces: Sequence[bytes]) -> Sampled:
    """Sample one sequence's next token from its logits [n_vocab]."""
    return sample_batch(np.asarray(logits)[None, :], [row], pieces)[0]


def sample_batch(logits: np.ndarray, rows: Sequence[Row], pieces: Sequence[bytes]) -> list[Sampled]:
    """Sample each row of logits [B, n_vocab] with its own parameters; errors are per row."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits of shape {logits.shape} do not match {len(rows)} rows")
    finite = np.isfinite(logits).all(axis=1)
    want_lp = [i for i, r in enumerate(rows) if r.logprobs is not None and finite[i]]
    raw = logits[want_lp].astype(np.float64) if want_lp else None
    logz = log_normalisers(raw) if want_lp else None
    out: list[Sampled] = []
    for i, row in enumerate(rows):
        if not finite[i]:
            out.append(Sampled(error=NON_FINITE))
            continue
        try:
            token = choose(*candidates(shape(logits[i], row.params, row.counts), row), row)
        except (ValueError, IndexError, TypeError, ArithmeticError) as exc:  # only this row fails
            out.append(Sampled(error=f"sampling failed: {exc}"))
            continue
        lp = None
        if row.logprobs is not None:
            j = want_lp.index(i)
            r, z = raw[j], float(logz[j])
            top = [(pieces[int(t)], float(r[t] - z)) for t in top_ids(r, row.logprobs)]
            lp = TokenLogprob(float(r[token] - z), top)
        out.append(Sampled(token, lp))
    return out
