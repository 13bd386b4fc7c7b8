"""BatchedEngine.step_pooled: the summed final hidden states (after ln_f) of several slots' chunks in one step.

Against the clean float64 GPT-J (tests/reference/gptj_numpy.pooled_embedding): f32/f16 weights within
EXACT_MAX_ABS on unit vectors, quantized weights cosine >= QUANT_MIN_COS. Both attention forms are covered
(f32/f16 keep the expert form, quantized models the flash form). Pooled chunks added to a step leave the
logits of its decode rows and prompt chunk unchanged. `pytest -s` prints the figures.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.batched import require_ggml

require_ggml()

from backends.batched import BatchedEngine, EngineConfig  # noqa: E402
from backends.ggml.reader import read_hparams, read_tensors  # noqa: E402
from backends.ggml.writer import GPTJConfig, write_model  # noqa: E402
from tests.reference.gptj_numpy import pooled_embedding  # noqa: E402

MODEL = dict(n_vocab=512, n_ctx=128, n_embd=128, n_head=4, n_layer=2, n_rot=16)
EXACT_MAX_ABS, EXACT_MIN_COS = 5e-4, 0.99999
QUANT_MIN_COS = 0.999
SAME_MAX_ABS = 1e-4  # the same input read in other company / other chunk splits (float32 rounding)


def _ids(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, MODEL["n_vocab"], n)]


def _unit(total: np.ndarray, n: int) -> np.ndarray:
    mean = total / n
    return mean / np.linalg.norm(mean)


@pytest.mark.parametrize("ftype", ["f32", "f16", "q8_0", "q4_0"])
def test_pooled_hidden_states_match_numpy_gptj(tmp_path, ftype):
    path = tmp_path / f"gptj-{ftype}.bin"
    write_model(path, GPTJConfig(ftype=ftype, **MODEL), seed=1234)
    hparams, tensors = read_hparams(path), read_tensors(path)
    inputs = [_ids(1, 5), _ids(2, 60), _ids(3, 17)]
    with BatchedEngine(str(path), EngineConfig(n_slots=4, threads=1)) as eng:
        # three inputs in one step, the long one read in two steps (the second beside a generation chunk)
        _, _, sums = eng.step_pooled([], None, [(0, inputs[0]), (1, inputs[1][:30]), (2, inputs[2])])
        _, last, more = eng.step_pooled([], (3, [1, 2, 3]), [(1, inputs[1][30:])])
        assert last is not None and last.shape == (MODEL["n_vocab"],)
        sums[1] = sums[1] + more[0]
    failures = []
    for ids, total in zip(inputs, sums):
        got, ref = _unit(total, len(ids)), pooled_embedding(tensors, hparams, ids)
        max_abs, cos = float(np.max(np.abs(got - ref))), float(got @ ref)
        line = f"{ftype:5s} {len(ids):3d} tokens: max|diff| {max_abs:.2e}  cosine {cos:.8f}"
        print(line)
        ok = max_abs <= EXACT_MAX_ABS and cos >= EXACT_MIN_COS if ftype in ("f32", "f16") else cos >= QUANT_MIN_COS
        if not ok:
            failures.append(line)
    assert not failures, "pooled hidden states and numpy GPT-J disagree:\n" + "\n".join(failures)
    # a control: the vector of another input is far away (the comparison can tell inputs apart)
    other = pooled_embedding(tensors, hparams, _ids(9, 5))
    assert float(np.max(np.abs(_unit(sums[0], 5) - other))) > 0.05


@pytest.mark.parametrize("ftype", ["f32", "q4_0"])
def test_pooled_chunks_leave_the_steps_logits_unchanged(tmp_path, ftype):
    path = tmp_path / f"gptj-{ftype}.bin"
    write_model(path, GPTJConfig(ftype=ftype, **MODEL), seed=99)
    prompts = [_ids(10, 12), _ids(11, 7)]
    chunk = _ids(12, 9)
    emb = [_ids(13, 11), _ids(14, 4)]

    def run(pooled: bool):
        with BatchedEngine(str(path), EngineConfig(n_slots=6, threads=1)) as eng:
            for slot, p in enumerate(prompts):
                eng.prefill(slot, p)
            decodes = [(0, 5), (1, 6)]
            if not pooled:
                return (*eng.step(decodes, (2, chunk)), None)
            return eng.step_pooled(decodes, (2, chunk), [(3, emb[0]), (4, emb[1])])

    dec, last, _ = run(False)
    dec2, last2, sums = run(True)
    assert np.max(np.abs(dec - dec2)) <= 1e-4 and np.max(np.abs(last - last2)) <= 1e-4
    with BatchedEngine(str(path), EngineConfig(n_slots=2, threads=1)) as eng:
        alone = []
        for e in emb:
            eng.reset(0)  # each input from position 0 of a slot
            alone.append(eng.step_pooled([], None, [(0, e)])[2][0])
    for a, b, e in zip(alone, sums, emb):
        assert np.max(np.abs(_unit(a, len(e)) - _unit(b, len(e)))) <= SAME_MAX_ABS


def test_a_step_of_only_pooled_chunks_returns_no_logits(tmp_path):
    path = tmp_path / "gptj.bin"
    write_model(path, GPTJConfig(ftype="q8_0", **MODEL), seed=5)
    with BatchedEngine(str(path), EngineConfig(n_slots=2, threads=1)) as eng:
        dec, last, sums = eng.step_pooled([], None, [(1, [1, 2, 3])])
        assert dec.shape == (0, MODEL["n_vocab"]) and last is None and len(sums) == 1
        assert sums[0].shape == (MODEL["n_embd"],) and sums[0].dtype == np.float64
        assert eng.length(1) == 3 and eng.length(0) == 0
        with pytest.raises(ValueError, match="twice"):
            eng.step_pooled([(1, 4)], None, [(1, [5])])
        with pytest.raises(ValueError, match="out of range"):
            eng.step_pooled([], None, [(0, [MODEL["n_vocab"]])])
