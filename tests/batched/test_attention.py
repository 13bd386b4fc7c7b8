"""The two attention forms (backends/batched/attention.py): which models get which, and that both compute
the same thing whichever way a step's tokens are grouped.

* Quantized weights: ggml flash attention (decode tokens as one query per slot, a chunk over its slot).
* f32/f16 weights: ggml_mul_mat_id over (slot, head) matrices, which sums V in f32.
* A step mixing decode tokens of unordered slots with another slot's prompt chunk gives what the same
  tokens give as separate steps (BATCH_MAX_ABS: matmul kernels sum in another order for another batch
  size, as in test_batching).
* Flash attention's f16 V sums stay far inside quantized-weight error at long positions.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.batched import require_ggml

require_ggml()

from backends.batched import BatchedEngine, EngineConfig  # noqa: E402
from backends.batched.lib import ggml  # noqa: E402
from backends.ggml.reader import read_hparams, read_tensors  # noqa: E402
from tests.models import write_random  # noqa: E402
from tests.reference.gptj_numpy import forward  # noqa: E402

BATCH_MAX_ABS = 1e-4
QUANT_MIN_CORRELATION = 0.999  # as test_reference for quantized weights


def _ops(eng: BatchedEngine) -> set[str]:
    """Op names in every graph the engine holds."""
    names = set()
    for g in eng._graphs.values():
        for i in range(ggml.ggml_graph_n_nodes(g.graph)):
            names.add(ggml.ggml_op_name(ggml.ggml_graph_node(g.graph, i).contents.op).decode())
    return names


@pytest.mark.parametrize("ftype, flash", [("q4_0", True), ("q8_0", True), ("f16", False), ("f32", False)])
def test_quantized_models_use_flash_attention(tmp_path, ftype, flash):
    path = write_random(tmp_path / f"rand-{ftype}.bin", ftype=ftype)
    with BatchedEngine(str(path), EngineConfig(n_slots=3, threads=1)) as eng:
        eng.prefill(0, [1, 2, 3])
        eng.step([(0, 4)], (2, [5, 6]))
        eng.decode([(2, 7), (0, 8)])
        ops = _ops(eng)
        assert ("FLASH_ATTN_EXT" in ops) is flash, ops
        assert ("MUL_MAT_ID" in ops) is not flash, ops
        assert eng.cache.v_transposed is not flash  # the V layout each form reads


@pytest.mark.parametrize("ftype", ["q4_0", "f32"])
def test_a_mixed_step_equals_its_parts(tmp_path, ftype):
    path = write_random(tmp_path / f"rand-{ftype}.bin", ftype=ftype, n_ctx=96)
    rng = np.random.default_rng(5)
    prompts = {s: [int(t) for t in rng.integers(0, 512, n)] for s, n in ((0, 9), (2, 40), (3, 17), (5, 23))}
    chunk = [int(t) for t in rng.integers(0, 512, 12)]
    with BatchedEngine(str(path), EngineConfig(n_slots=6, threads=1)) as eng:
        for s, p in prompts.items():
            eng.prefill(s, p)
        eng.prefill(4, [9] * 30)  # slot 4 then holds stale positions beyond its new length
        eng.reset(4, 3)
        mixed, last = eng.step([(3, 11), (0, 12), (5, 13)], (4, chunk))  # slots out of order, 1 idle
        for s, p in prompts.items():
            eng.reset(s, len(p))
        eng.reset(4, 3)
        apart = [eng.decode([(s, t)])[0] for s, t in ((3, 11), (0, 12), (5, 13))]
        alone = eng.prefill(4, chunk, start=3)
    np.testing.assert_allclose(mixed, np.stack(apart), rtol=0, atol=BATCH_MAX_ABS)
    np.testing.assert_allclose(last, alone, rtol=0, atol=BATCH_MAX_ABS)


def test_flash_attention_at_long_positions(tmp_path):
    path = write_random(tmp_path / "rand-q8_0.bin", ftype="q8_0", n_ctx=1024)
    hparams, tensors = read_hparams(path), read_tensors(path)
    tokens = [int(t) for t in np.random.default_rng(11).integers(0, 512, 770)]
    with BatchedEngine(str(path), EngineConfig(n_slots=2, threads=1)) as eng:
        got = {767: eng.prefill(1, tokens[:768])}
        eng.prefill(0, tokens[:100])
        got[768] = eng.decode([(1, tokens[768]), (0, tokens[100])])[0]
        got[769] = eng.decode([(1, tokens[769])])[0]
    ref = forward(tensors, hparams, tokens)
    for pos, logits in got.items():
        corr = float(np.corrcoef(logits, ref[pos])[0, 1])
        print(f"q8_0 pos {pos}: corr {corr:.6f}  max|diff| {np.max(np.abs(logits - ref[pos])):.3e}")
        assert corr >= QUANT_MIN_CORRELATION, (pos, corr)
