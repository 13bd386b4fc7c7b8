"""The GGML GPT-J files this project writes are real GPT-J.

For every weight type, a small random model is written with the project's writer, loaded in
ctransformers and evaluated; its logits are compared with an independent numpy forward pass of
GPT-J (tests/reference/gptj_numpy.py) run on the weights as the project's reader dequantizes them.

Two positions are checked: the last token of a prompt evaluated in one batch, then one more token
evaluated on its own (which goes through the engine's KV cache and the rotary path at a new
position).

Why the tolerances: even with f32 weights ctransformers keeps its KV cache in f16 and computes
GELU through an f16 lookup table; with f16 weights every matmul also rounds its activations to
f16; with quantized weights the activations are quantized to q8_0/q8_1 before each matmul. The
reference uses the exact dequantized weights in float64, so quantized types are compared by
correlation, not by absolute difference.

`pytest -s` prints the measured figures.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from backends.ggml.reader import read_hparams, read_tensors
from backends.ggml.writer import GPTJConfig, write_model
from tests.reference.gptj_numpy import forward

ctransformers_llm = pytest.importorskip("ctransformers.llm")
LLM, Config = ctransformers_llm.LLM, ctransformers_llm.Config

FTYPES = ["f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
EXACT_FTYPES = {"f32", "f16"}
MAX_ABS_DIFF = 1e-3  # f32 / f16
MIN_CORRELATION = 0.999  # quantized types

# Partial rotary as in GPT-J 6B (64 of 256 dims per head): here 16 of 32.
MODEL = dict(n_vocab=512, n_ctx=128, n_embd=128, n_head=4, n_layer=2, n_rot=16)
PROMPT_LEN = 12


def _load(path) -> "LLM":
    return LLM(str(path), "gptj", config=Config(threads=1, batch_size=32), lib="avx2")


def _last_logits(llm, n_vocab: int) -> np.ndarray:
    """A copy of the logits of the last evaluated position."""
    size = llm.ctransformers_llm_logits_size()
    assert size >= n_vocab, f"engine returned {size} logits, expected at least {n_vocab}"
    ptr = llm.ctransformers_llm_logits_data()
    data = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(size,))
    return np.array(data[size - n_vocab :], dtype=np.float64)  # copy


def _figures(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    return float(np.max(np.abs(got - ref))), float(np.corrcoef(got, ref)[0, 1])


@pytest.mark.parametrize("ftype", FTYPES)
def test_engine_logits_match_numpy_gptj(tmp_path, ftype):
    path = tmp_path / f"gptj-{ftype}.bin"
    write_model(path, GPTJConfig(ftype=ftype, **MODEL), seed=1234)

    hparams = read_hparams(path)
    for key, value in MODEL.items():
        assert hparams[key] == value, f"{key}: header says {hparams[key]}, wrote {value}"
    tensors = read_tensors(path)

    rng = np.random.default_rng(7)
    tokens = [int(t) for t in rng.integers(0, MODEL["n_vocab"], PROMPT_LEN + 1)]
    prompt, extra = tokens[:PROMPT_LEN], tokens[PROMPT_LEN:]

    llm = _load(path)
    try:
        llm.eval(prompt, batch_size=32, threads=1)
        got_prompt = _last_logits(llm, MODEL["n_vocab"])
        llm.eval(extra, batch_size=32, threads=1)  # one more token, through the KV cache
        got_next = _last_logits(llm, MODEL["n_vocab"])
    finally:
        del llm

    ref = forward(tensors, hparams, tokens)
    checks = [
        (f"position {PROMPT_LEN - 1} (prompt batch)", got_prompt, ref[PROMPT_LEN - 1]),
        (f"position {PROMPT_LEN} (next token)", got_next, ref[PROMPT_LEN]),
    ]

    # The comparison only means something if the logits are not flat and the positions differ.
    assert ref[-1].std() > 1e-2, f"{ftype}: reference logits are near-degenerate (std {ref[-1].std():.3g})"
    assert np.max(np.abs(ref[-1] - ref[-2])) > 1e-2, f"{ftype}: both positions give the same logits"

    failures = []
    for label, got, want in checks:
        max_abs, corr = _figures(got, want)
        line = (
            f"{ftype:5s} {label:28s} max|diff| {max_abs:.3e}  corr {corr:.8f}  "
            f"logit std {want.std():.3f}  argmax engine/ref {int(got.argmax())}/{int(want.argmax())}"
        )
        print(line)
        if ftype in EXACT_FTYPES:
            if not max_abs <= MAX_ABS_DIFF:
                failures.append(f"{line}  (limit max|diff| {MAX_ABS_DIFF})")
        elif not corr >= MIN_CORRELATION:
            failures.append(f"{line}  (limit corr {MIN_CORRELATION})")
    assert not failures, "engine and numpy GPT-J disagree:\n" + "\n".join(failures)
