"""backends.ggml writer + reader: round trips, determinism, every rejection, and ctransformers loading."""

from __future__ import annotations

import hashlib
import struct
import time

import numpy as np
import pytest

from backends.ggml import (
    GPTJConfig,
    LegacyModelFileError,
    ModelFileError,
    default_vocab,
    inspect_model,
    list_tensors,
    read_hparams,
    read_tensors,
    read_vocab,
    write_model,
)
from backends.ggml.constants import (
    GGML_MAGIC,
    GGML_TYPE_F32,
    GGML_TYPE_Q4_0,
    LEGACY_TYPE_BLOCK,
    TYPE_BLOCK,
    gptj_tensor_shapes,
    tensors_per_model,
)
from tests.models import engine_logits, load_engine, wrong_successors

FTYPES = ["f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
FTYPE_CODES = {"f32": 0, "f16": 1, "q4_0": 2002, "q4_1": 2003, "q5_0": 2008, "q5_1": 2009, "q8_0": 2007}
SMALL = dict(n_vocab=320, n_ctx=64, n_embd=64, n_head=4, n_layer=2, n_rot=8)
N_LAYER, N, V = SMALL["n_layer"], SMALL["n_embd"], SMALL["n_vocab"]
N_PARAMS = 2 * V * N + V + 2 * N + N_LAYER * (12 * N * N + 7 * N)  # wte, lm_head, ln_f, blocks


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def q4_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ggml") / "q4_0.bin"
    write_model(path, GPTJConfig(ftype="q4_0", **SMALL), seed=3)
    return path


def patched(tmp_path, src, edits: dict[int, bytes] | None = None, *, cut: int = 0, extra: bytes = b""):
    """A copy of `src` with bytes replaced at offsets, `cut` bytes removed from the end, `extra` appended."""
    data = bytearray(src.read_bytes())
    for off, new in (edits or {}).items():
        data[off : off + len(new)] = new
    if cut:
        del data[-cut:]
    out = tmp_path / "patched.bin"
    out.write_bytes(bytes(data) + extra)
    return out


def record_offset(path, name: str) -> int:
    """Offset of the tensor record (its n_dims field) named `name`."""
    t = next(t for t in list_tensors(path) if t.name == name)
    return t.offset - len(name) - 4 * len(t.shape) - 12


def reject(path, *fragments: str, cls=ModelFileError) -> str:
    with pytest.raises(cls) as exc:
        inspect_model(path)
    msg = str(exc.value)
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# ---------------------------------------------------------------- write -> inspect / read


@pytest.mark.parametrize("ftype", FTYPES)
def test_write_then_inspect_every_ftype(tmp_path, ftype):
    path = tmp_path / f"{ftype}.bin"
    write_model(path, GPTJConfig(ftype=ftype, **SMALL))
    info = inspect_model(path)
    assert (info.n_vocab, info.n_ctx, info.n_embd, info.n_head, info.n_layer, info.n_rot) == tuple(SMALL.values())
    assert info.architecture == "gptj"
    assert info.ftype == ftype and info.ftype_code == FTYPE_CODES[ftype]
    assert info.quant_version == (2 if ftype not in ("f32", "f16") else 0)
    assert info.n_tensors == tensors_per_model(N_LAYER) == 5 + 10 * N_LAYER == 25
    assert info.n_params == N_PARAMS
    assert info.file_size == path.stat().st_size
    assert info.eos_token_id == default_vocab(V).index(b"<|endoftext|>")
    assert f"{ftype} (header ftype {FTYPE_CODES[ftype]}" in info.describe()

    hp = read_hparams(path)
    assert hp == {**SMALL, "ftype": FTYPE_CODES[ftype]}
    assert read_vocab(path) == default_vocab(V)
    tensors = read_tensors(path)
    assert list(tensors) == list(gptj_tensor_shapes(V, N, N_LAYER))  # HF state-dict order
    for name, shape in gptj_tensor_shapes(V, N, N_LAYER).items():
        assert tensors[name].shape == shape and tensors[name].dtype == np.float32
    records = list_tensors(path)
    wtype = records[0].ggml_type
    assert all(r.ggml_type == (wtype if len(r.shape) == 2 else GGML_TYPE_F32) for r in records)
    assert records[-1].offset + records[-1].nbytes == info.file_size


def test_file_layout_bytes(q4_file):
    data = q4_file.read_bytes()
    assert struct.unpack_from("<I7i", data, 0) == (GGML_MAGIC, *SMALL.values(), 2002)
    assert struct.unpack_from("<iI", data, 32) == (V, 1) and data[40:41] == b"\x00"
    first = record_offset(q4_file, "transformer.wte.weight")
    assert struct.unpack_from("<5i", data, first) == (2, 22, GGML_TYPE_Q4_0, N, V)
    assert data[first + 20 : first + 42] == b"transformer.wte.weight"
    assert len(data) == first + 42 + V * N // 32 * 18 + sum(
        12 + 4 * len(r.shape) + len(r.name) + r.nbytes for r in list_tensors(q4_file)[1:]
    )


def test_random_weights_are_sane(q4_file):
    t = read_tensors(q4_file)
    assert 0.8 < t["transformer.h.0.ln_1.weight"].mean() < 1.2
    assert 0.5 < t["transformer.wte.weight"].std() < 2
    assert 0 < t["transformer.h.1.attn.q_proj.weight"].std() < 0.5
    assert len({t[k].tobytes() for k in t if k.endswith("q_proj.weight")}) == N_LAYER


def test_default_vocab():
    vocab = default_vocab(512)
    assert len(vocab) == 512 and len(set(vocab)) == 512
    assert all(bytes([i]) in vocab for i in range(256))
    assert vocab.count(b"<|endoftext|>") == 1
    for tok in [" the", "Hello", "ing", "é", "日本", "😀"]:
        assert tok.encode() in vocab
    assert default_vocab(512) == vocab
    assert default_vocab(300)[:293] == vocab[:293]  # the EOS id does not depend on n_vocab
    assert default_vocab(300).index(b"<|endoftext|>") == vocab.index(b"<|endoftext|>")
    with pytest.raises(ValueError, match=">= 300"):
        default_vocab(299)


def test_writer_rejects_bad_arguments(tmp_path):
    p = tmp_path / "x.bin"
    with pytest.raises(ValueError, match="unknown ftype"):
        write_model(p, GPTJConfig(n_vocab=300, ftype="q3_k"))
    with pytest.raises(ValueError, match="vocab has 2 tokens"):
        write_model(p, GPTJConfig(n_vocab=300), vocab=[b"a", b"b"])
    with pytest.raises(ValueError, match="multiple of 32"):
        write_model(p, GPTJConfig(n_vocab=300, n_embd=48, n_head=4))
    with pytest.raises(ValueError, match="n_rot"):
        write_model(p, GPTJConfig(n_vocab=300, n_rot=32))
    with pytest.raises(ValueError, match="kind"):
        write_model(p, GPTJConfig(n_vocab=300), kind="zeros")
    assert not list(tmp_path.iterdir())  # nothing written, no temp file left


def test_deterministic_bytes(tmp_path, q4_file):
    again, other = tmp_path / "again.bin", tmp_path / "other.bin"
    write_model(again, GPTJConfig(ftype="q4_0", **SMALL), seed=3)
    write_model(other, GPTJConfig(ftype="q4_0", **SMALL), seed=4)
    assert sha(again) == sha(q4_file)
    assert sha(other) != sha(q4_file)
    s1, s2 = tmp_path / "s1.bin", tmp_path / "s2.bin"
    write_model(s1, GPTJConfig(ftype="q8_0", **SMALL), kind="successor", seed=1)
    write_model(s2, GPTJConfig(ftype="q8_0", **SMALL), kind="successor", seed=1)
    assert sha(s1) == sha(s2)


# ---------------------------------------------------------------- rejections


def test_rejects_missing_path_and_directory(tmp_path):
    reject(tmp_path / "nope.bin", "no such file")
    reject(tmp_path, "not a regular file")
    (tmp_path / "empty.bin").write_bytes(b"")
    reject(tmp_path / "empty.bin", "only 0 bytes")


@pytest.mark.parametrize(
    "head,fragment",
    [
        (b"\x7fELF", "not a GGML file"),
        (b"GGUF", "GGUF"),
        (struct.pack("<I", 0x67676A74), "'ggjt'"),
        (struct.pack("<I", 0x67676D66), "'ggmf'"),
        (b"PK\x03\x04", "zip archive"),
    ],
)
def test_rejects_bad_magic(tmp_path, q4_file, head, fragment):
    reject(patched(tmp_path, q4_file, {0: head}), "bad magic", fragment)


@pytest.mark.parametrize(
    "code,fragment",
    [
        (2006, "unknown ftype 2006"),
        (-1, "unknown ftype -1"),
        (2004, "q4_1_some_f16) is not supported"),
        (2012, "q4_K) is not supported"),
        (1002, "quantization version 1"),
        (3002, "unknown ftype 3002"),
    ],
)
def test_rejects_unknown_ftype(tmp_path, q4_file, code, fragment):
    reject(patched(tmp_path, q4_file, {28: struct.pack("<i", code)}), fragment)


def test_rejects_bad_hparams(tmp_path, q4_file):
    reject(patched(tmp_path, q4_file, {16: struct.pack("<i", 5)}), "n_head 5 does not divide n_embd 64")
    reject(patched(tmp_path, q4_file, {24: struct.pack("<i", 32)}), "n_rot 32 is outside [0, 16]")
    reject(patched(tmp_path, q4_file, {4: struct.pack("<i", 0)}), "n_vocab=0")
    reject(patched(tmp_path, q4_file, {20: struct.pack("<i", 2**31 - 1)}), "implausible hyperparameter n_layer")
    reject(patched(tmp_path, q4_file, {32: struct.pack("<i", V - 1)}), f"vocabulary has {V - 1} tokens", f"n_vocab={V}")
    reject(patched(tmp_path, q4_file, cut=q4_file.stat().st_size - 20), "truncated inside the header")


def test_rejects_wrong_tensor_shape(tmp_path, q4_file):
    off = record_offset(q4_file, "transformer.h.0.mlp.fc_in.weight")  # dims (n, 4n) -> (4n, n)
    bad = patched(tmp_path, q4_file, {off + 12: struct.pack("<2i", 4 * N, N)})
    reject(bad, "tensor 'transformer.h.0.mlp.fc_in.weight' has shape [64, 256], expected [256, 64]")


def test_rejects_wrong_tensor_type(tmp_path, q4_file):
    off = record_offset(q4_file, "transformer.h.1.ln_1.bias")
    reject(patched(tmp_path, q4_file, {off + 8: struct.pack("<i", 1)}), "'transformer.h.1.ln_1.bias' is stored as f16, expected f32")
    off = record_offset(q4_file, "lm_head.weight")
    reject(patched(tmp_path, q4_file, {off + 8: struct.pack("<i", 8)}), "stored as q8_0, expected q4_0")


def test_rejects_unexpected_and_duplicate_tensor(tmp_path, q4_file):
    off = record_offset(q4_file, "transformer.h.1.ln_1.bias") + 16
    reject(patched(tmp_path, q4_file, {off: b"transformer.h.7."}), "unexpected tensor 'transformer.h.7.ln_1.bias'", "n_layer=2")
    reject(patched(tmp_path, q4_file, {off: b"transformer.h.0."}), "duplicate tensor 'transformer.h.0.ln_1.bias'")


def test_rejects_missing_tensor(tmp_path, q4_file):
    cut = q4_file.stat().st_size - record_offset(q4_file, "lm_head.bias")
    reject(patched(tmp_path, q4_file, cut=cut), "missing 1 of 25 tensors", "'lm_head.bias'")


def test_rejects_truncated_file(tmp_path, q4_file):
    reject(patched(tmp_path, q4_file, cut=10), "truncated", "'lm_head.bias'", "10 bytes missing")
    reject(patched(tmp_path, q4_file, cut=q4_file.stat().st_size - 100), "truncated inside the vocabulary")


def test_rejects_trailing_bytes(tmp_path, q4_file):
    reject(patched(tmp_path, q4_file, extra=b"\0" * 7), "7 trailing bytes after the last tensor")
    reject(patched(tmp_path, q4_file, extra=b"x" * 4000), "4000 trailing bytes")


def test_error_is_a_value_error(tmp_path):
    assert issubclass(ModelFileError, ValueError) and issubclass(LegacyModelFileError, ModelFileError)
    with pytest.raises(ValueError, match="nope.bin"):
        read_tensors(tmp_path / "nope.bin")


# ---------------------------------------------------------------- GPT4All legacy (pre-May-2023) layout

LEGACY_FRAGMENTS = ("GPT4All's legacy pre-May-2023 GGML layout", "needs a one-time conversion")


@pytest.mark.parametrize("ftype,code", [("q4_0", 2), ("q4_1", 3), ("q4_2", 5), ("q8_0", 7)])
def test_rejects_legacy_layout_written(tmp_path, ftype, code):
    path = tmp_path / "legacy.bin"
    write_model(path, GPTJConfig(ftype=ftype, **SMALL), legacy=True)
    reject(path, *LEGACY_FRAGMENTS, f"header ftype {code} = {ftype}", cls=LegacyModelFileError)
    assert read_hparams(path)["ftype"] == code and read_vocab(path) == default_vocab(V)
    assert read_tensors(path, allow_legacy=True)["lm_head.weight"].shape == (V, N)


def _repack_legacy(src, dst):
    """Turn a standard q4_0 file into GPT4All's layout: ftype 2, f32 scales, nibbles in pairs."""
    data = bytearray(src.read_bytes())
    data[28:32] = struct.pack("<i", 2)
    out, pos = bytearray(), 0
    for t in list_tensors(src):
        out += data[pos : t.offset]
        pos = t.offset + t.nbytes
        if t.ggml_type != GGML_TYPE_Q4_0:
            out += data[t.offset : pos]
            continue
        blocks = np.frombuffer(bytes(data[t.offset : pos]), np.uint8).reshape(-1, 18)
        d32 = blocks[:, :2].copy().view("<f2").astype("<f4").view(np.uint8)
        q = np.concatenate([blocks[:, 2:] & 15, blocks[:, 2:] >> 4], axis=1)  # weights 0..31
        pairs = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
        out += np.concatenate([d32, pairs], axis=1).tobytes()
    dst.write_bytes(bytes(out))


def test_rejects_legacy_layout_patched_and_reads_it_losslessly(tmp_path, q4_file):
    legacy = tmp_path / "groovy-like.bin"
    _repack_legacy(q4_file, legacy)
    assert legacy.stat().st_size == q4_file.stat().st_size + 2 * sum(
        t.nbytes // 18 for t in list_tensors(q4_file) if t.ggml_type == GGML_TYPE_Q4_0
    )
    reject(legacy, *LEGACY_FRAGMENTS, cls=LegacyModelFileError)
    got, want = read_tensors(legacy, allow_legacy=True), read_tensors(q4_file)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    # damaged legacy file: still recognised, and the damage is reported
    reject(patched(tmp_path, legacy, cut=5), *LEGACY_FRAGMENTS, "looks damaged", cls=LegacyModelFileError)
    # header without quantization version over current (18-byte) blocks
    reject(patched(tmp_path, q4_file, {28: struct.pack("<i", 2)}), "lacks the quantization version (expected 2002)")


def _skeleton(path, hp: dict, ftype_raw: int, wtype: int, blocks: dict) -> None:
    """A full-size file with real headers and holes for the data (sparse on disk)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<I7i", GGML_MAGIC, *hp.values(), ftype_raw))
        vocab = default_vocab(hp["n_vocab"])
        f.write(struct.pack("<i", len(vocab)) + b"".join(struct.pack("<I", len(t)) + t for t in vocab))
        for name, shape in gptj_tensor_shapes(hp["n_vocab"], hp["n_embd"], hp["n_layer"]).items():
            ttype = wtype if len(shape) == 2 else GGML_TYPE_F32
            qk, size = blocks[ttype]
            f.write(struct.pack(f"<3i{len(shape)}i", len(shape), len(name), ttype, *shape[::-1]) + name.encode())
            f.seek(int(np.prod(shape)) // qk * size, 1)
        f.truncate()


GPTJ_6B = dict(n_vocab=50400, n_ctx=2048, n_embd=4096, n_head=16, n_layer=28, n_rot=64)


def _best_time(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def test_legacy_check_is_cheap_on_a_6b_sized_file(tmp_path):
    legacy, standard = tmp_path / "gpt4all-j-6b-legacy.bin", tmp_path / "gptj-6b-q4_0.bin"
    try:
        _skeleton(legacy, GPTJ_6B, 2, GGML_TYPE_Q4_0, LEGACY_TYPE_BLOCK)
        assert legacy.stat().st_size > 3_700_000_000  # groovy: 3,785,248,281 (with GPT-2's vocab)

        def check():
            with pytest.raises(LegacyModelFileError):
                inspect_model(legacy)

        assert _best_time(check) < 0.05

        _skeleton(standard, GPTJ_6B, 2002, GGML_TYPE_Q4_0, TYPE_BLOCK)
        info = inspect_model(standard)
        assert info.n_params == 6_050_882_784 and info.n_tensors == 285 and info.ftype == "q4_0"
        assert _best_time(lambda: inspect_model(standard)) < 0.05
    finally:  # sparse files, but do not leave multi-GB names behind
        legacy.unlink(missing_ok=True)
        standard.unlink(missing_ok=True)


# ---------------------------------------------------------------- ctransformers loads what we write

pytest.importorskip("ctransformers.llm")


SUCC = dict(SMALL, n_vocab=512, n_ctx=640)


@pytest.mark.parametrize("ftype", FTYPES)
def test_ctransformers_greedy_follows_successor(tmp_path, ftype):
    path = tmp_path / f"succ-{ftype}.bin"
    write_model(path, GPTJConfig(ftype=ftype, **SUCC), kind="successor", seed=11)
    info = inspect_model(path)
    eos = info.eos_token_id
    successor = [t + 1 for t in range(SUCC["n_vocab"] - 1)] + [eos]
    llm = load_engine(path)
    try:
        assert (llm.vocab_size, llm.context_length, llm.eos_token_id) == (SUCC["n_vocab"], SUCC["n_ctx"], eos)
        order = np.random.default_rng(0).permutation(SUCC["n_vocab"])  # arbitrary contexts
        wrong = wrong_successors(llm, order, successor, SUCC["n_vocab"])
        assert not wrong, f"{len(wrong)} tokens with the wrong greedy successor, e.g. {wrong[:5]}"
    finally:
        del llm


def test_ctransformers_many_to_one_successor(tmp_path):
    rng = np.random.default_rng(2)
    successor = [int(s) for s in rng.integers(0, 40, SUCC["n_vocab"])]  # ~13 tokens share each target
    path = tmp_path / "succ-many.bin"
    write_model(path, GPTJConfig(ftype="q4_0", **SUCC), kind="successor", successor=successor)
    llm = load_engine(path)
    try:
        for t in range(0, SUCC["n_vocab"], 3):
            llm.eval([t])
            assert int(np.argmax(engine_logits(llm, SUCC["n_vocab"]))) == successor[t]
    finally:
        del llm


@pytest.mark.parametrize("ftype", FTYPES)
def test_ctransformers_loads_random_model_and_context_matters(tmp_path, ftype):
    path = tmp_path / f"rand-{ftype}.bin"
    write_model(path, GPTJConfig(ftype=ftype, **SMALL), seed=5)
    outs = []
    for prefix in ([1, 2, 3], [200, 100, 3]):  # same last token, different context
        llm = load_engine(path)
        llm.eval(prefix)
        outs.append(engine_logits(llm, V))
        del llm
    assert outs[0].std() > 0.5
    assert np.max(np.abs(outs[0] - outs[1])) > 0.1
