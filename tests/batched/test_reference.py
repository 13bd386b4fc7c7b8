"""The batched engine computes GPT-J: logits vs the project's independent numpy GPT-J, every ftype.

Same model, prompt and bounds as tests/test_engine_reference.py uses for ctransformers, against the
clean float64 GPT-J (`forward`): f32 and f16 weights max|diff| <= 2.5e-3 x max(1, logit std) and
correlation >= 0.99999; quantized weights correlation >= 0.999. Modern ggml rotates only the first
n_rot dims of a head (GPT-J's partial rotary), so the reference is `rope="gptj"`, not ctransformers'
whole-head variant. Deviations come from rounding: the f16 KV cache, f16 Q/probabilities in the
attention products, ggml's GELU, and activations quantized to q8 against quantized weights.

Three positions are checked: the last prompt token (prefill in one chunk), the next token alone
(decode through the KV cache), and the same next token decoded inside a batch with other slots.
`pytest -s` prints the figures.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.batched import require_ggml

require_ggml()

from backends.batched import BatchedEngine, EngineConfig  # noqa: E402
from backends.ggml.reader import read_hparams, read_tensors  # noqa: E402
from backends.ggml.writer import GPTJConfig, write_model  # noqa: E402
from tests.reference.gptj_numpy import forward  # noqa: E402
from tests.test_engine_reference import _neox_pairs  # noqa: E402

FTYPES = ["f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
EXACT_FTYPES = {"f32", "f16"}
EXACT_MAX_ABS_PER_STD = 2.5e-3
EXACT_MIN_CORRELATION = 0.99999
QUANT_MIN_CORRELATION = 0.999
CONTROL_MIN_MAX_ABS = 0.1
MODEL = dict(n_vocab=512, n_ctx=128, n_embd=128, n_head=4, n_layer=2, n_rot=16)  # as test_engine_reference
PROMPT_LEN = 12
SEED = 1234


def _figures(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    return float(np.max(np.abs(got - ref))), float(np.corrcoef(got, ref)[0, 1])


@pytest.mark.parametrize("ftype", FTYPES)
def test_batched_logits_match_numpy_gptj(tmp_path, ftype):
    path = tmp_path / f"gptj-{ftype}.bin"
    write_model(path, GPTJConfig(ftype=ftype, **MODEL), seed=SEED)
    hparams, tensors = read_hparams(path), read_tensors(path)
    rng = np.random.default_rng(7)
    tokens = [int(t) for t in rng.integers(0, MODEL["n_vocab"], PROMPT_LEN + 1)]
    others = [[int(t) for t in rng.integers(0, MODEL["n_vocab"], n)] for n in (3, 20, 7)]

    with BatchedEngine(str(path), EngineConfig(n_slots=4, threads=1)) as eng:
        got_prompt = eng.prefill(1, tokens[:PROMPT_LEN])
        got_next = eng.decode([(1, tokens[PROMPT_LEN])])[0]
        eng.reset(1, PROMPT_LEN)  # same token again, now decoded among three other sequences
        for slot, seq in zip((0, 2, 3), others):
            eng.prefill(slot, seq[:-1])
        batch = [(0, others[0][-1]), (1, tokens[PROMPT_LEN]), (2, others[1][-1]), (3, others[2][-1])]
        got_batched = eng.decode(batch)[1]

    ref = forward(tensors, hparams, tokens)
    exact = ftype in EXACT_FTYPES
    failures = []
    for pos, how, got in [(PROMPT_LEN - 1, "prompt chunk", got_prompt), (PROMPT_LEN, "next token", got_next),
                          (PROMPT_LEN, "in a batch", got_batched)]:
        want = ref[pos]
        std = float(want.std())
        assert std > 0.1, f"{ftype}: reference logits are near-degenerate at position {pos}"
        max_abs, corr = _figures(got, want)
        line = (f"{ftype:5s} pos {pos:2d} ({how:12s}) clean GPT-J: max|diff| {max_abs:.3e}  corr {corr:.8f}  "
                f"logit std {std:.3f}  argmax {int(got.argmax())}/{int(want.argmax())}")
        print(line)
        if exact:
            limit = EXACT_MAX_ABS_PER_STD * max(1.0, std)
            if not (max_abs <= limit and corr >= EXACT_MIN_CORRELATION):
                failures.append(f"{line}  (limits: max|diff| {limit:.2e}, corr {EXACT_MIN_CORRELATION})")
        elif not corr >= QUANT_MIN_CORRELATION:
            failures.append(f"{line}  (limit: corr {QUANT_MIN_CORRELATION})")
    assert not failures, "batched engine and numpy GPT-J disagree:\n" + "\n".join(failures)

    if ftype == "f32":  # controls: the comparison is sharp enough to see a rotary mistake
        controls = {"no rotary": forward(tensors, {**hparams, "n_rot": 0}, tokens),
                    "NeoX-style rotary pairs": forward(_neox_pairs(tensors, hparams), hparams, tokens)}
        for name, wrong in controls.items():
            max_abs, _ = _figures(got_next, wrong[PROMPT_LEN])
            print(f"control {name:24s} max|diff| {max_abs:.3e}")
            assert max_abs >= CONTROL_MIN_MAX_ABS, f"a reference with {name} is only {max_abs:.3e} away"
def test_partial_rotary_at_long_positions(tmp_path):
    """Only the first n_rot dims of a head turn (GPT-J), unlike ctransformers' whole-head rope.

    At positions 384..767 the dims past n_rot would turn by up to ~0.08 rad; the engine must match
    the GPT-J reference clearly better than the whole-head variant (and within the exact bound).
    """
    cfg = dict(n_vocab=512, n_ctx=1024, n_embd=64, n_head=4, n_layer=2, n_rot=8)
    path = tmp_path / "gptj-long.bin"
    write_model(path, GPTJConfig(ftype="f32", **cfg), seed=SEED)
    hparams, tensors = read_hparams(path), read_tensors(path)
    tokens = [int(t) for t in np.random.default_rng(11).integers(0, cfg["n_vocab"], 768)]
    got = {}
    with BatchedEngine(str(path), EngineConfig(n_slots=2, threads=1)) as eng:
        for start in range(0, len(tokens), 64):
            logits = eng.prefill(1, tokens[start:start + 64], start=start)
            if start >= 384:
                got[start + 63] = logits
    means = {}
    for mode in ("gptj", "ggml"):
        ref = forward(tensors, hparams, tokens, rope=mode)
        means[mode] = float(np.mean([np.max(np.abs(got[p] - ref[p])) for p in got]))
    print(f"positions {min(got)}..{max(got)}: mean max|diff| vs GPT-J rope {means['gptj']:.2e}, "
          f"vs whole-head rope {means['ggml']:.2e}")
    assert means["gptj"] <= EXACT_MAX_ABS_PER_STD * 2, f"engine vs GPT-J partial rope: {means['gptj']:.2e}"
    assert means["ggml"] >= 5 * means["gptj"], f"whole-head rope not distinguishable: {means}"


@pytest.mark.parametrize("ftype", FTYPES)
def test_batched_logits_match_ctransformers(tmp_path, ftype):
    """Same file, same tokens, both engines in one process (ggml-python's symbols kept local)."""
    pytest.importorskip("ctransformers.llm")
    from tests.models import ctransformers_logits

    path = tmp_path / f"gptj-{ftype}.bin"
    write_model(path, GPTJConfig(ftype=ftype, **MODEL), seed=SEED)
    tokens = [int(t) for t in np.random.default_rng(7).integers(0, MODEL["n_vocab"], PROMPT_LEN + 1)]
    want = ctransformers_logits(path, tokens, PROMPT_LEN, MODEL["n_vocab"])
    with BatchedEngine(str(path), EngineConfig(n_slots=2, threads=1)) as eng:
        got = [eng.prefill(1, tokens[:PROMPT_LEN]), eng.decode([(1, tokens[PROMPT_LEN])])[0]]
    for g, w in zip(got, want):
        max_abs, corr = _figures(g, w)
        print(f"{ftype:5s} vs ctransformers: max|diff| {max_abs:.3e}  corr {corr:.8f}")
        if ftype in EXACT_FTYPES:  # each is within the exact bound of clean GPT-J, so of each other twice
            assert max_abs <= 2 * EXACT_MAX_ABS_PER_STD * max(1.0, float(w.std())), max_abs
        assert corr >= 0.9999, corr
