"""Writes small GGML GPT-J model files (random or "successor" weights) that ctransformers loads."""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import numpy as np

from .constants import (
    EOS_TOKEN,
    FTYPE_CODES,
    GGML_MAGIC,
    GGML_TYPE_F16,
    GGML_TYPE_F32,
    GGML_TYPE_Q4_0,
    GGML_TYPE_Q4_1,
    GGML_TYPE_Q4_2,
    GGML_TYPE_Q8_0,
    NAME_TO_GGML_TYPE,
    QK,
    QNT_VERSION,
    QNT_VERSION_FACTOR,
    QUANTIZED_FTYPES,
    gptj_tensor_shapes,
)
from .quants import dequantize, dequantize_legacy, quantize, quantize_legacy

MIN_VOCAB = 300
_CHUNK = 1 << 22  # weights quantized at once
# Legacy (pre-May-2023, GPT4All-J style) files: base ftype code and tensor type per name.
LEGACY_FTYPES: dict[str, tuple[int, int]] = {
    "q4_0": (2, GGML_TYPE_Q4_0),
    "q4_1": (3, GGML_TYPE_Q4_1),
    "q4_2": (5, GGML_TYPE_Q4_2),
    "q8_0": (7, GGML_TYPE_Q8_0),
}

# Always present, in this order, right after the 256 single bytes; EOS follows them.
_CORE_TOKENS = [
    " the", "the", " The", "The", "Hello", " Hello", "hello", " hello", " world", "world",
    "ing", "ed", "er", "es", "re", "on", "in", "an", " and", " a", " of", " to", " in", " is",
    " it", " that", " for", " you", " I", "\n\n", "  ", " 1", "é", "日本", "😀", " café",
]
# Added after EOS while there is room (n_vocab permitting), then unique fillers.
_EXTRA_TOKENS = [
    " with", " as", " was", " be", " this", " are", " not", " have", " he", " she", " they",
    " we", " at", " by", " from", " or", " an", " but", " all", " can", " will", " one", " two",
    " three", " four", " five", "ion", "tion", "th", "he", "at", "en", "or", "ar", "al", "ly",
    " Paris", " France", " capital", " quick", " brown", " fox", " jumps", " over", " lazy",
    " dog", " cat", " time", " year", " people", " day", " good", " new", " first", " last",
    " long", " great", " little", " own", " other", " old", " right", " big", " high",
    "The quick", " once", " upon", " story", " world!", "Hi", " Hi", " there", "!\n", ".\n",
    ", ", ". ", "...", "    ", "\n", " 0", " 2", " 3", "10", "100", "2023", " ü", "ñ", "€",
    "—", "“", "”", "中文", "日本語", " 日本", "こんにちは", "😀😀", "🙂", "Ж", " Привет",
]


class ConfigError(ValueError):
    """Hyperparameters that cannot make a valid file; `field` is the GPTJConfig field at fault."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


@dataclass
class GPTJConfig:
    """Hyperparameters of a GPT-J file to write."""

    n_vocab: int
    n_ctx: int = 256
    n_embd: int = 64
    n_head: int = 4
    n_layer: int = 2
    n_rot: int = 8
    ftype: str = "q4_0"

    def check(self, legacy: bool = False) -> int:
        """Raise ConfigError naming the first invalid field; return the weights' ggml type."""
        table = LEGACY_FTYPES if legacy else NAME_TO_GGML_TYPE
        if self.ftype not in table:
            kind = "legacy " if legacy else ""
            raise ConfigError("ftype", f"unknown {kind}ftype {self.ftype!r}; expected one of {sorted(table)}")
        for name in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if not isinstance(value, Integral) or value <= 0:
                raise ConfigError(name, f"{name} must be a positive integer, got {value!r}")
        if self.n_vocab < MIN_VOCAB:
            raise ConfigError("n_vocab", f"n_vocab must be >= {MIN_VOCAB} (256 byte tokens, common words and "
                                         f"<|endoftext|>), got {self.n_vocab}")
        if self.n_embd % self.n_head:
            raise ConfigError("n_embd", f"n_embd must be a multiple of n_head ({self.n_head}), got {self.n_embd}")
        head_dim = self.n_embd // self.n_head
        if not isinstance(self.n_rot, Integral) or not 0 <= self.n_rot <= head_dim or self.n_rot % 2:
            raise ConfigError("n_rot", f"n_rot must be even and in [0, {head_dim}] (n_embd / n_head), "
                                       f"got {self.n_rot!r}")
        wtype = LEGACY_FTYPES[self.ftype][1] if legacy else NAME_TO_GGML_TYPE[self.ftype]
        if wtype not in (GGML_TYPE_F32, GGML_TYPE_F16) and self.n_embd % QK:
            raise ConfigError("n_embd", f"n_embd must be a multiple of {QK} with the quantized ftype "
                                        f"{self.ftype} (its blocks hold {QK} weights), got {self.n_embd}")
        return wtype


def default_vocab(n_vocab: int = 512) -> list[bytes]:
    """Deterministic vocab: 256 bytes, common words, <|endoftext|>, more words, unique fillers."""
    if n_vocab < MIN_VOCAB:
        raise ValueError(f"n_vocab must be >= {MIN_VOCAB}, got {n_vocab}")
    vocab = [bytes([i]) for i in range(256)]
    vocab += [t.encode() for t in _CORE_TOKENS]
    vocab.append(EOS_TOKEN)
    seen = set(vocab)
    for t in _EXTRA_TOKENS:
        tok = t.encode()
        if len(vocab) < n_vocab and tok not in seen:
            vocab.append(tok)
            seen.add(tok)
    i = 0
    while len(vocab) < n_vocab:
        vocab.append(f"<|extra_{i}|>".encode())
        i += 1
    return vocab


def _random_weights(config: GPTJConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights with per-fan-in scales: logits std ~2 that depend on context."""
    n = config.n_embd
    shapes = gptj_tensor_shapes(config.n_vocab, n, config.n_layer)
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        g = rng.standard_normal(shape, dtype=np.float32)
        if name == "transformer.wte.weight":
            scale = 1.0
        elif name == "lm_head.weight":
            scale = 2.0 / np.sqrt(n)
        elif name.endswith(("ln_1.weight", "ln_f.weight")):
            out[name] = (1.0 + 0.1 * g).astype(np.float32)
            continue
        elif name.endswith(("ln_1.bias", "ln_f.bias")):
            scale = 0.05
        elif name.endswith("mlp.fc_out.weight"):
            scale = 0.5 / np.sqrt(4 * n)
        elif len(shape) == 2:  # q, k, v, out_proj, fc_in: 1/sqrt(fan_in)
            scale = 1.0 / np.sqrt(shape[1])
        else:  # fc_in/fc_out/lm_head biases
            scale = 0.1
        g *= np.float32(scale)
        out[name] = g
    return out


def _roundtrip(x: np.ndarray, wtype: int, legacy: bool) -> np.ndarray:
    """What a reader sees of `x` stored as `wtype`."""
    enc, dec = (quantize_legacy, dequantize_legacy) if legacy else (quantize, dequantize)
    return dec(enc(x.reshape(-1), wtype), wtype, x.size).reshape(x.shape)


def _layer_norm(x: np.ndarray) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5)


def _successor_weights(
    config: GPTJConfig,
    rng: np.random.Generator,
    successor: list[int],
    wtype: int,
    legacy: bool = False,
    min_margin: float = 2.0,
) -> dict[str, np.ndarray]:
    """Weights whose greedy next token after t is successor[t], whatever the context.

    Attention out_proj and MLP fc_out (weights and biases) are zero, so the final residual is the token
    embedding. Every target s gets a random code c_s; token t is embedded as c_{successor[t]} plus a
    small per-token perturbation (so all embeddings differ), and lm_head[s] = scale * LN(c_s). Since all
    LN(c_s) have the same norm, the logit of successor[t] wins; many-to-one maps need no special case.
    The margin is checked on the weights as stored (after quantization) before writing.
    """
    n, v = config.n_embd, config.n_vocab
    if len(successor) != v:
        raise ValueError(f"successor has {len(successor)} entries, expected n_vocab={v}")
    succ = np.asarray(successor, dtype=np.int64)
    if succ.min() < 0 or succ.max() >= v:
        raise ValueError("successor ids must be in [0, n_vocab)")
    weights = _random_weights(config, rng)
    codes = rng.standard_normal((v, n), dtype=np.float32)
    wte = codes[succ] + np.float32(0.25) * rng.standard_normal((v, n), dtype=np.float32)
    scale = np.float32(30.0 / n)  # the winning logit is ~30
    weights["transformer.wte.weight"] = wte.astype(np.float32)
    weights["lm_head.weight"] = (scale * _layer_norm(codes)).astype(np.float32)
    weights["lm_head.bias"] = np.zeros(v, np.float32)
    weights["transformer.ln_f.weight"] = np.ones(n, np.float32)
    weights["transformer.ln_f.bias"] = np.zeros(n, np.float32)
    for i in range(config.n_layer):
        for suffix in ("attn.out_proj.weight", "mlp.fc_out.weight", "mlp.fc_out.bias"):
            key = f"transformer.h.{i}.{suffix}"
            weights[key] = np.zeros_like(weights[key])
    # Check the margin with the stored (dequantized) weights, a block of rows at a time.
    hidden = _layer_norm(_roundtrip(weights["transformer.wte.weight"], wtype, legacy).astype(np.float64))
    head = _roundtrip(weights["lm_head.weight"], wtype, legacy).astype(np.float64)
    margin = np.inf
    for start in range(0, v, 256):
        logits = hidden[start : start + 256] @ head.T
        rows, cols = np.arange(len(logits)), succ[start : start + 256]
        win = logits[rows, cols]
        logits[rows, cols] = -np.inf
        margin = min(margin, float((win - logits.max(axis=1)).min()))
    if margin < min_margin:
        raise ConfigError("n_embd", f"n_embd {n} is too small for a successor model of {v} tokens (the logit "
                                    f"margin {margin:.2f} is below {min_margin}: greedy choices would not be "
                                    "reliable); use a larger n_embd")
    return weights


def _default_successor(vocab: list[bytes]) -> list[int]:
    eos = vocab.index(EOS_TOKEN) if EOS_TOKEN in vocab else len(vocab) - 1
    return [t + 1 for t in range(len(vocab) - 1)] + [eos]


def _tensor_record(name: str, arr: np.ndarray, ttype: int, data: bytes) -> bytes:
    dims = list(reversed(arr.shape))  # innermost (row length) first
    enc = name.encode()
    return struct.pack(f"<3i{len(dims)}i", len(dims), len(enc), ttype, *dims) + enc + data


def write_model(
    path: str | os.PathLike,
    config: GPTJConfig,
    *,
    vocab: list[bytes] | None = None,
    seed: int = 0,
    kind: str = "random",
    successor: list[int] | None = None,
    legacy: bool = False,
) -> None:
    """Write a GGML GPT-J file (deterministic for the same arguments), atomically.

    kind="random": random weights; kind="successor": greedy next token after t is successor[t]
    (default t+1, the last id -> EOS). legacy=True writes GPT4All's pre-May-2023 layout instead
    (ftype without quantization version, f32 scales, nibble pairs; ftype q4_0, q4_1, q4_2 or q8_0),
    which ctransformers cannot load: it is meant for testing detection and conversion.
    """
    wtype = config.check(legacy)
    vocab = default_vocab(config.n_vocab) if vocab is None else list(vocab)
    if len(vocab) != config.n_vocab:
        raise ValueError(f"vocab has {len(vocab)} tokens, config.n_vocab is {config.n_vocab}")
    rng = np.random.default_rng(seed)
    if kind == "random":
        if successor is not None:
            raise ValueError("successor= only applies to kind='successor'")
        weights = _random_weights(config, rng)
    elif kind == "successor":
        succ = _default_successor(vocab) if successor is None else list(successor)
        weights = _successor_weights(config, rng, succ, wtype, legacy)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected 'random' or 'successor'")

    if legacy:
        ftype_raw = LEGACY_FTYPES[config.ftype][0]
        encode = quantize_legacy
    else:
        code = FTYPE_CODES[config.ftype]
        ftype_raw = code + (QNT_VERSION * QNT_VERSION_FACTOR if code in QUANTIZED_FTYPES else 0)
        encode = quantize
    hparams = (config.n_vocab, config.n_ctx, config.n_embd, config.n_head, config.n_layer, config.n_rot)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<I7i", GGML_MAGIC, *hparams, ftype_raw))
            f.write(struct.pack("<i", len(vocab)))
            for tok in vocab:
                f.write(struct.pack("<I", len(tok)) + bytes(tok))
            for name, arr in weights.items():
                ttype = wtype if arr.ndim == 2 else GGML_TYPE_F32
                rows = arr.reshape(-1, arr.shape[-1])
                step = max(1, _CHUNK // rows.shape[1])  # bound the quantizer's temporaries
                data = b"".join(encode(rows[i : i + step].reshape(-1), ttype) for i in range(0, len(rows), step))
                f.write(_tensor_record(name, arr, ttype, data))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
