"""backends.ggml.convert: GPT4All's legacy (pre-May-2023) GGML GPT-J layout -> the standard layout.

Fidelity bounds asserted (x = weight as the legacy file stores it, x' = as the converted file does):

* q4_0, q8_0: x = q*d with an integer q and a float32 scale d; the converter keeps q and rounds d to
  fp16, whose relative rounding error is at most 2^-11 (normal range), so |x' - x| <= 2^-11 |x|.
* q4_1: x = q*d + m with 0 <= q <= 15; d and m are both rounded to fp16, so
  |x' - x| <= 2^-11 (15 |d| + |m|) per block.
* q4_2 (16-weight blocks with their own fp16 scale; no current equivalent) is re-quantized to q4_0
  with ggml's reference quantizer: per 32-weight block of absolute maximum A, d = A/8, and every
  weight is off by at most d/2, or d for the one clamped level (+8 d does not exist), plus the fp16
  rounding of d (8 * 2^-11 d), so |x' - x| <= A/8 * (1 + 2^-8).
* f32 and f16 need no conversion: a legacy file's f32 tensors (all 1-D ones) are copied byte for
  byte, and f32/f16 *files* never had a different layout, so the converter reports "nothing to do".

When a legacy scale is exactly representable in fp16 (a standard file turned legacy), the repack is
lossless: converting gives back the standard file byte for byte.

`pytest -s` prints the measured differences and memory.
"""

from __future__ import annotations

import shlex
import struct
import tracemalloc

import numpy as np
import pytest

from backends.ggml import GPTJConfig, ModelFileError, inspect_model, list_tensors, read_tensors, read_vocab
from backends.ggml import write_model
from backends.ggml.constants import GGML_TYPE_F32, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q8_0
from backends.ggml import convert as convert_module
from backends.ggml.convert import ConvertError, convert_legacy
from backends.ggml.reader import LegacyModelFileError, convert_command, converted_path, read_hparams
from tests.models import load_engine, wrong_successors

SMALL = dict(n_vocab=320, n_ctx=64, n_embd=64, n_head=4, n_layer=2, n_rot=8)
N_TENSORS = 25  # wte, 10 per layer, ln_f (2), lm_head (2)
LEGACY = ["q4_0", "q4_1", "q4_2", "q8_0"]
STD_FTYPE = {"q4_0": 2002, "q4_1": 2003, "q4_2": 2002, "q8_0": 2007}
FP16_REL = 2.0**-11  # fp16 rounding, relative, normal range
# Standard block layouts (fp16 scales, nibble halves) and their legacy twins (f32 scales, nibble pairs).
STD_BLOCK = {
    GGML_TYPE_Q4_0: [("d", "<f2"), ("qs", "u1", 16)],
    GGML_TYPE_Q4_1: [("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)],
    GGML_TYPE_Q8_0: [("d", "<f2"), ("qs", "u1", 32)],
}


@pytest.fixture(scope="module")
def legacy_files(tmp_path_factory):
    """One small legacy model per legacy type (random weights, seed 1)."""
    root = tmp_path_factory.mktemp("legacy")
    files = {}
    for ftype in LEGACY:
        files[ftype] = root / f"ggml-gpt4all-j-{ftype}.bin"
        write_model(files[ftype], GPTJConfig(ftype=ftype, **SMALL), seed=1, legacy=True)
    return files


def _raw(path, t) -> bytes:
    with open(path, "rb") as f:
        f.seek(t.offset)
        return f.read(t.nbytes)


def _legacy_fields(path, ftype: str):
    """Per-block legacy scales (and mins) of every 2-D tensor: {name: (d, m or None)}."""
    layouts = {"q4_0": [("d", "<f4"), ("qs", "u1", 16)], "q4_1": [("d", "<f4"), ("m", "<f4"), ("qs", "u1", 16)]}
    blocks = np.dtype(layouts[ftype])
    out = {}
    for t in list_tensors(path, allow_legacy=True):
        if len(t.shape) == 2:
            b = np.frombuffer(_raw(path, t), blocks)
            out[t.name] = (b["d"].astype(np.float64), b["m"].astype(np.float64) if "m" in b.dtype.names else None)
    return out


# ---------------------------------------------------------------- conversion and fidelity


@pytest.mark.parametrize("ftype", LEGACY)
def test_converts_every_legacy_type(tmp_path, legacy_files, ftype):
    src, dst = legacy_files[ftype], tmp_path / "out.bin"
    calls = []
    report = convert_legacy(src, dst, progress=lambda done, total: calls.append((done, total)))
    info = inspect_model(dst)  # (a) the reader accepts it as a standard file
    assert info.ftype_code == STD_FTYPE[ftype] and info.n_tensors == N_TENSORS
    assert (report.src, report.dst, report.src_ftype, report.dst_ftype) == (src, dst, ftype, info.ftype)
    assert report.tensors == N_TENSORS and report.bytes_written == dst.stat().st_size
    assert report.requantized == (2 + 6 * SMALL["n_layer"] if ftype == "q4_2" else 0)  # the 2-D tensors
    assert calls == [(i, N_TENSORS) for i in range(1, N_TENSORS + 1)]
    assert not (tmp_path / "out.bin.part").exists()
    want_hp, got_hp = read_hparams(src), read_hparams(dst)
    assert {**want_hp, "ftype": STD_FTYPE[ftype]} == got_hp and read_vocab(dst) == read_vocab(src)
    for a, b in zip(list_tensors(src, allow_legacy=True), list_tensors(dst)):
        assert (a.name, a.shape) == (b.name, b.shape)
        if a.ggml_type == GGML_TYPE_F32:  # f32 passes through byte for byte
            assert b.ggml_type == GGML_TYPE_F32 and _raw(src, a) == _raw(dst, b)


@pytest.mark.parametrize("ftype", LEGACY)
def test_dequantized_weights_match_within_fp16_rounding_of_scales(tmp_path, legacy_files, ftype):
    src, dst = legacy_files[ftype], tmp_path / "out.bin"
    convert_legacy(src, dst)
    old, new = read_tensors(src, allow_legacy=True), read_tensors(dst)
    fields = _legacy_fields(src, ftype) if ftype in ("q4_1",) else {}
    worst_abs = worst_ratio = 0.0
    for name, x in old.items():
        x, y = x.astype(np.float64), new[name].astype(np.float64)
        diff = np.abs(y - x)
        if x.ndim == 1:
            assert np.array_equal(x, y), name
            continue
        if ftype in ("q4_0", "q8_0"):
            bound = FP16_REL * np.abs(x) * (1 + 2.0**-20)
        elif ftype == "q4_1":
            d, m = fields[name]
            bound = np.repeat(FP16_REL * (15 * np.abs(d) + np.abs(m)), 32).reshape(x.shape) * (1 + 2.0**-20)
        else:  # q4_2 -> q4_0 re-quantization, per 32-weight block
            amax = np.abs(x.reshape(-1, 32)).max(axis=1)
            bound = np.repeat(amax / 8 * (1 + 2.0**-8), 32).reshape(x.shape)
        assert (diff <= bound).all(), f"{name}: {int((diff > bound).sum())} weights beyond the bound"
        worst_abs = max(worst_abs, float(diff.max()))
        worst_ratio = max(worst_ratio, float((diff / np.where(bound > 0, bound, 1)).max()))
    assert worst_abs > 0  # the scales really were rounded (the bound is not met trivially)
    print(f"\n{ftype}: max |converted - legacy| = {worst_abs:.3g}, max diff/bound = {worst_ratio:.3f}")


def _to_legacy(std, out) -> None:
    """Rewrite a standard quantized file in the legacy layout (ftype - 2000, f32 scales, nibble pairs)."""
    data = bytearray(std.read_bytes())
    struct.pack_into("<i", data, 28, read_hparams(std)["ftype"] - 2000)
    pieces, pos = [], 0
    for t in list_tensors(std):
        pieces.append(data[pos : t.offset])
        pos = t.offset + t.nbytes
        if t.ggml_type not in STD_BLOCK:
            pieces.append(data[t.offset : pos])
            continue
        b = np.frombuffer(bytes(data[t.offset : pos]), np.dtype(STD_BLOCK[t.ggml_type]))
        legacy = np.dtype([(n, "<f4") if n in ("d", "m") else (n, *spec) for n, *spec in STD_BLOCK[t.ggml_type]])
        out_b = np.empty(len(b), legacy)
        for name in b.dtype.names:
            out_b[name] = b[name]
        if t.ggml_type != GGML_TYPE_Q8_0:
            q = np.concatenate([b["qs"] & 15, b["qs"] >> 4], axis=1)  # weights 0..31
            out_b["qs"] = q[:, 0::2] | (q[:, 1::2] << 4)
        pieces.append(out_b.tobytes())
    out.write_bytes(b"".join(bytes(p) for p in pieces))


@pytest.mark.parametrize("ftype", ["q4_0", "q4_1", "q8_0"])
def test_repack_is_lossless_when_scales_fit_fp16(tmp_path, ftype):
    std, legacy, back = tmp_path / "std.bin", tmp_path / "legacy.bin", tmp_path / "back.bin"
    write_model(std, GPTJConfig(ftype=ftype, **SMALL), seed=4)
    _to_legacy(std, legacy)
    with pytest.raises(LegacyModelFileError):
        inspect_model(legacy)
    convert_legacy(legacy, back)
    assert back.read_bytes() == std.read_bytes()


# ---------------------------------------------------------------- the converted file runs in ctransformers

pytest.importorskip("ctransformers.llm")
SUCC = dict(SMALL, n_vocab=512, n_ctx=256)


def _greedy(llm, start: int, n: int) -> list[int]:
    out = []
    for tok in llm.generate([start], top_k=1, seed=0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("ftype", LEGACY)
def test_converted_successor_model_generates_like_the_standard_one(tmp_path, ftype):
    legacy, conv, std = tmp_path / "legacy.bin", tmp_path / "conv.bin", tmp_path / "std.bin"
    write_model(legacy, GPTJConfig(ftype=ftype, **SUCC), kind="successor", seed=11, legacy=True)
    std_ftype = "q4_0" if ftype == "q4_2" else ftype
    write_model(std, GPTJConfig(ftype=std_ftype, **SUCC), kind="successor", seed=11)
    convert_legacy(legacy, conv)
    eos = inspect_model(conv).eos_token_id
    successor = [t + 1 for t in range(SUCC["n_vocab"] - 1)] + [eos]
    llm = load_engine(conv)
    try:
        order = np.random.default_rng(0).permutation(SUCC["n_vocab"])[:200]  # arbitrary contexts
        wrong = wrong_successors(llm, order, successor, SUCC["n_vocab"])
        assert not wrong, f"{len(wrong)} tokens with the wrong greedy successor, e.g. {wrong[:5]}"
        got = [_greedy(llm, start, 24) for start in (5, 300)]
    finally:
        del llm
    ref = load_engine(std)
    try:
        want = [_greedy(ref, start, 24) for start in (5, 300)]
    finally:
        del ref
    assert got == want == [list(range(6, 30)), list(range(301, 325))]


# ---------------------------------------------------------------- refusals and failures


@pytest.mark.parametrize("ftype", ["f32", "f16", "q4_0", "q8_0"])
def test_standard_file_is_refused_as_nothing_to_do(tmp_path, ftype):
    src, dst = tmp_path / "std.bin", tmp_path / "out.bin"
    write_model(src, GPTJConfig(ftype=ftype, **SMALL))
    with pytest.raises(ConvertError, match=f"already in the standard GGML layout \\({ftype}.*nothing to convert"):
        convert_legacy(src, dst)
    assert not dst.exists() and not (tmp_path / "out.bin.part").exists()


def _patched(src, out, *, cut: int = 0, edits: dict[int, bytes] | None = None):
    data = bytearray(src.read_bytes())
    for off, new in (edits or {}).items():
        data[off : off + len(new)] = new
    out.write_bytes(bytes(data[: len(data) - cut]))
    return out


def test_damaged_legacy_file_is_refused(tmp_path, legacy_files):
    assert issubclass(ConvertError, ModelFileError)
    bad = _patched(legacy_files["q4_0"], tmp_path / "cut.bin", cut=7)
    with pytest.raises(ConvertError, match="legacy GGML file is damaged .*truncated.*download it again"):
        convert_legacy(bad, tmp_path / "out.bin")
    assert list(tmp_path.iterdir()) == [bad]
    with pytest.raises(ConvertError, match="bad magic"):
        convert_legacy(_patched(legacy_files["q4_0"], tmp_path / "junk.bin", edits={0: b"junk"}), tmp_path / "o.bin")
    with pytest.raises(ConvertError, match="no such file"):
        convert_legacy(tmp_path / "missing.bin", tmp_path / "o.bin")


def test_unsupported_legacy_type_is_refused(tmp_path):
    std = tmp_path / "q5_0.bin"
    write_model(std, GPTJConfig(ftype="q5_0", **SMALL))  # legacy q5_0 blocks had the same size
    legacy = _patched(std, tmp_path / "legacy-q5_0.bin", edits={28: struct.pack("<i", 8)})
    with pytest.raises(ConvertError, match="legacy q5_0 blocks .* cannot be converted; supported legacy types: q4_0"):
        convert_legacy(legacy, tmp_path / "out.bin")


def test_existing_output_and_output_equal_to_input(tmp_path, legacy_files):
    src, dst = legacy_files["q8_0"], tmp_path / "out.bin"
    dst.write_bytes(b"keep me")
    with pytest.raises(ConvertError, match="already exists"):
        convert_legacy(src, dst)
    assert dst.read_bytes() == b"keep me"
    assert convert_legacy(src, dst, overwrite=True).bytes_written == dst.stat().st_size
    for same in (src, src.parent / ".." / src.parent.name / src.name):
        with pytest.raises(ConvertError, match="the output is the input file"):
            convert_legacy(src, same, overwrite=True)
    assert inspect_model(dst).ftype == "q8_0" and list_tensors(src, allow_legacy=True)


def test_part_file_is_removed_on_failure(tmp_path, legacy_files):
    src, dst = legacy_files["q4_0"], tmp_path / "out.bin"

    def interrupt(done, total):
        assert (tmp_path / "out.bin.part").exists()
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_legacy(src, dst, progress=interrupt)
    assert list(tmp_path.iterdir()) == []
    # a block scale beyond the fp16 range cannot be repacked: a clear error, nothing left behind
    t = next(t for t in list_tensors(src, allow_legacy=True) if t.name == "transformer.h.1.attn.q_proj.weight")
    huge = _patched(src, tmp_path / "huge.bin", edits={t.offset: struct.pack("<f", 1e6)})
    with pytest.raises(ConvertError, match="'transformer.h.1.attn.q_proj.weight'.*exceeds the fp16 range"):
        convert_legacy(huge, dst)
    assert list(tmp_path.iterdir()) == [huge]


def test_legacy_error_message_gives_a_pasteable_convert_command(tmp_path, legacy_files):
    folder = tmp_path / "my models"
    folder.mkdir()
    src = folder / "ggml-gpt4all-j-v1.3-groovy.bin"
    src.write_bytes(legacy_files["q4_0"].read_bytes())
    with pytest.raises(LegacyModelFileError) as err:
        inspect_model(src)
    assert convert_command(src) in str(err.value)
    argv = shlex.split(str(err.value).rsplit("convert it with: ", 1)[1])
    assert argv == ["gpt4all-j-server", "convert", str(src), str(folder / "ggml-gpt4all-j-v1.3-groovy.converted.bin")]
    assert converted_path(src) == folder / "ggml-gpt4all-j-v1.3-groovy.converted.bin"
    convert_legacy(argv[2], argv[3])
    assert inspect_model(argv[3]).ftype == "q4_0"


# ---------------------------------------------------------------- memory: one chunk of one tensor

MEM = dict(n_vocab=1024, n_ctx=64, n_embd=256, n_head=4, n_layer=12, n_rot=8)  # ~6.3 MB, tensors <= 160 KiB
SLACK = 64 * 1024  # tensor list, record headers, vocab prefix, Python objects


@pytest.mark.parametrize("ftype", ["q4_0", "q4_2"])
def test_peak_memory_is_about_one_tensor(tmp_path, ftype):
    """Repacking needs < 3x the largest tensor; q4_2 re-quantization a fixed float32 workspace per chunk."""
    src, dst = tmp_path / "legacy.bin", tmp_path / "out.bin"
    write_model(src, GPTJConfig(ftype=ftype, **MEM), legacy=True)
    largest = max(t.nbytes for t in list_tensors(src, allow_legacy=True))
    size = src.stat().st_size
    tracemalloc.start()
    try:
        convert_legacy(src, dst)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"\n{ftype}: file {size:,} B, largest tensor {largest:,} B, peak traced {peak:,} B "
          f"({peak / largest:.2f}x the largest tensor, {peak / size:.3f}x the file)")
    assert inspect_model(dst).ftype == "q4_0"
    if ftype == "q4_2":  # dequantized float32 chunk + the q4_0 quantizer's temporaries: ~18 B per weight
        assert peak < 24 * convert_module.REQUANT_CHUNK_WEIGHTS + SLACK
    else:
        assert peak < 3 * largest + SLACK
    assert peak < size / 8
