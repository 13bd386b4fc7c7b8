"""Converted legacy files load in the batched engine as they are, and compute what ctransformers does.

A GPT4All legacy-layout file (pre-May-2023 blocks, written by the project's writer) goes through the
project's converter (backends.ggml.convert.convert_legacy, what `model-pull`/`convert` run); the
converted file then loads in the batched engine without any further conversion, and its logits agree
with ctransformers on the same converted file, and with the numpy GPT-J, to test_reference's bounds
for quantized weights. The unconverted legacy file is refused with a clear error, not read as garbage.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.batched import require_ggml

require_ggml()

from backends.batched import BatchedEngine, EngineConfig  # noqa: E402
from backends.ggml.convert import convert_legacy  # noqa: E402
from backends.ggml.errors import ModelFileError  # noqa: E402
from backends.ggml.reader import inspect_model, read_hparams, read_tensors  # noqa: E402
from backends.ggml.writer import LEGACY_FTYPES, GPTJConfig, write_model  # noqa: E402
from tests.batched.test_reference import MODEL, PROMPT_LEN, QUANT_MIN_CORRELATION, SEED, _figures  # noqa: E402
from tests.reference.gptj_numpy import forward  # noqa: E402

CTRANSFORMERS_MIN_CORRELATION = 0.9999  # test_reference's bound between the two engines
CONVERTED_TO = {"q4_0": "q4_0", "q4_1": "q4_1", "q8_0": "q8_0", "q4_2": "q4_0"}  # q4_2 is requantized


@pytest.fixture(scope="module", params=sorted(LEGACY_FTYPES))
def converted(request, tmp_path_factory):
    """(legacy file, its conversion, legacy ftype)."""
    d = tmp_path_factory.mktemp(f"legacy-{request.param}")
    legacy, std = d / "legacy.bin", d / "converted.bin"
    write_model(legacy, GPTJConfig(ftype=request.param, **MODEL), seed=SEED, legacy=True)
    convert_legacy(legacy, std)
    return legacy, std, request.param


def test_a_legacy_file_is_refused_until_converted(converted):
    legacy, std, ftype = converted
    with pytest.raises(ModelFileError):
        BatchedEngine(str(legacy), EngineConfig(n_slots=1, threads=1))
    assert inspect_model(std).ftype == CONVERTED_TO[ftype]


def test_converted_file_logits_match_ctransformers_and_numpy_gptj(converted):
    pytest.importorskip("ctransformers.llm")
    from tests.models import ctransformers_logits

    _, path, ftype = converted
    tokens = [int(t) for t in np.random.default_rng(7).integers(0, MODEL["n_vocab"], PROMPT_LEN + 1)]
    want = ctransformers_logits(path, tokens, PROMPT_LEN, MODEL["n_vocab"])
    with BatchedEngine(str(path), EngineConfig(n_slots=2, threads=1)) as eng:
        got = [eng.prefill(1, tokens[:PROMPT_LEN]), eng.decode([(1, tokens[PROMPT_LEN])])[0]]
    ref = forward(read_tensors(path), read_hparams(path), tokens)
    for pos, g, w in zip((PROMPT_LEN - 1, PROMPT_LEN), got, want):
        max_abs, corr = _figures(g, w)
        _, ref_corr = _figures(g, ref[pos])
        print(f"legacy {ftype} -> {CONVERTED_TO[ftype]} pos {pos}: vs ctransformers max|diff| {max_abs:.3e} "
              f"corr {corr:.8f}; vs numpy GPT-J corr {ref_corr:.8f}")
        assert corr >= CTRANSFORMERS_MIN_CORRELATION, corr
        assert ref_corr >= QUANT_MIN_CORRELATION, ref_corr
