"""The batched engine's contract: slots, prefix reuse, limits, memory figures, repacking, graph reuse."""

from __future__ import annotations

import numpy as np
import pytest

from tests.batched import require_ggml

require_ggml()

from backends.batched import BatchedEngine, EngineConfig, memory_needed  # noqa: E402
from backends.batched.memory import kv_cache_bytes as kv_bytes  # noqa: E402
from tests.models import write_random  # noqa: E402


@pytest.fixture(scope="module")
def q4_path(tmp_path_factory):
    return write_random(tmp_path_factory.mktemp("batched") / "rand-q4_0.bin", ftype="q4_0", n_ctx=96, n_embd=64)


def test_prefix_reuse_gives_the_same_logits(q4_path):
    toks = [int(t) for t in np.random.default_rng(1).integers(0, 512, 40)]
    with BatchedEngine(str(q4_path), EngineConfig(n_slots=2, threads=1)) as eng:
        full = eng.prefill(0, toks)
        eng.prefill(1, toks[:25] + [7, 8, 9])  # a different turn after a common prefix
        reused = eng.prefill(1, toks[25:], start=25)  # keeps the first 25 cached tokens
        assert eng.length(1) == 40
        np.testing.assert_array_equal(reused, full)
        with pytest.raises(ValueError):
            eng.prefill(0, [1], start=41)  # cannot keep more than is cached


def test_limits_and_errors(q4_path):
    with BatchedEngine(str(q4_path), EngineConfig(n_slots=2, n_ctx=40, threads=1)) as eng:
        assert (eng.n_slots, eng.n_ctx, eng.n_vocab, eng.eos_token_id) == (2, 40, 512, 292)
        with pytest.raises(IndexError):
            eng.decode([(2, 1)])
        with pytest.raises(ValueError):
            eng.decode([(0, 1), (0, 2)])
        with pytest.raises(ValueError):
            eng.decode([(0, 512)])
        with pytest.raises(ValueError):
            eng.decode([])
        eng.prefill(0, [1] * 39)
        eng.decode([(0, 1)])
        with pytest.raises(OverflowError):
            eng.decode([(0, 1), (1, 1)])  # slot 0 is full; nothing is written
        assert (eng.length(0), eng.length(1)) == (40, 0)
        with pytest.raises(OverflowError):
            eng.prefill(0, [1] * 3, start=38)  # refused before anything is forgotten
        assert eng.length(0) == 40
        eng.reset(0)
        assert eng.length(0) == 0
        eng.decode([(0, 1), (1, 1)])


def test_memory_figures_and_repacking(q4_path, tmp_path):
    cfg = EngineConfig(n_slots=3, n_ctx=64, threads=1)
    need = memory_needed(str(q4_path), cfg)
    assert need["kv_cache"] == kv_bytes(3, 64, 2, 64, "f16") == 2 * 2 * 3 * 64 * 64 * 2
    with BatchedEngine(str(q4_path), cfg) as eng:
        assert eng.cache.nbytes >= need["kv_cache"]
        rep = eng.weights.report
        assert rep.bytes_repacked + rep.bytes_plain == need["weights"]
        assert "transformer.wte.weight" not in rep.repacked  # read by get_rows, must stay plain
        on = eng.prefill(0, [5, 6, 7])
    if rep.repacked:  # AVX2 machines repack q4_0; every matmul weight then goes there
        assert len(rep.repacked) == 6 * 2 + 1
    with BatchedEngine(str(q4_path), EngineConfig(n_slots=1, threads=1, repack=False)) as eng:
        assert eng.weights.report.repacked == []
        off = eng.prefill(0, [5, 6, 7])
    assert np.corrcoef(on, off)[0, 1] > 0.9999
    f16 = write_random(tmp_path / "rand-f16.bin", ftype="f16", n_embd=64)
    with BatchedEngine(str(f16), EngineConfig(n_slots=1, threads=1)) as eng:
        assert eng.weights.report.repacked == []  # nothing to repack for f16


def test_graphs_are_built_once_per_shape(q4_path):
    with BatchedEngine(str(q4_path), EngineConfig(n_slots=2, threads=1)) as eng:
        eng.prefill(0, [1, 2, 3])
        eng.prefill(1, [4, 5])
        for _ in range(20):  # positions 3..22 and 2..21: all inside one KV_PAD bucket
            eng.decode([(0, 1), (1, 2)])
        shapes = list(eng._graphs)
    assert len(shapes) == 3, shapes  # prefill of 3, prefill of 2, decode of 2


def test_refuses_a_configuration_that_does_not_fit(q4_path, monkeypatch):
    from backends.batched import engine

    monkeypatch.setattr(engine, "available_memory", lambda: 1 << 20)
    with pytest.raises(MemoryError, match="lower the number of slots"):
        BatchedEngine(str(q4_path), EngineConfig(n_slots=64, threads=1))
