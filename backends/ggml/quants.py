"""ggml block quantizers and dequantizers, vectorized with numpy.

The quantizers reproduce ggml's *reference* quantizers (quantize_row_*_reference in the ggml.c bundled
with ctransformers 0.2.27, quantization version 2) bit for bit, in float32 arithmetic:

- q4_0: m = the value of largest magnitude (first one on ties), d = m / -8, id = 1/d (0 if d == 0),
  q = min(15, (int8)(x*id + 8.5)); stored d = fp16(d); x ~ (q - 8) * d.
- q4_1: d = (max - min) / 15, q = min(15, (int8)((x - min)*id + 0.5)); stored fp16 d, fp16 min;
  x ~ q * d + m.
- q5_0: d = m / -16, q = min(31, (int8)(x*id + 16.5)); x ~ (q - 16) * d.
- q5_1: d = (max - min) / 31, q = (uint8)((x - min)*id + 0.5); x ~ q * d + m.
- q8_0: d = amax / 127, q = roundf(x*id) (half away from zero); x ~ q * d.

Blocks hold 32 weights. The 4-bit part of weight j is the low nibble of byte j for j < 16 and the
high nibble of byte j - 16 for j >= 16; q5 keeps the fifth bit of weight j in bit j of a
little-endian uint32 stored before the nibbles. Scales are converted with numpy's float16 (round to
nearest even, like ggml's fp32->fp16), and quantization uses the unrounded float32 scale.

`quantize_legacy` / `dequantize_legacy` handle the pre-May-2023 layout (quantization version 0) of
q4_0, q4_1, q4_2 and q8_0 used by GPT4All-J files: float32 scales (fp16 for q4_2) and nibbles packed
in consecutive pairs (byte k = weight 2k in the low nibble, weight 2k+1 in the high nibble).
"""

from __future__ import annotations

import numpy as np

from .constants import (
    GGML_TYPE_F16,
    GGML_TYPE_F32,
    GGML_TYPE_Q4_0,
    GGML_TYPE_Q4_1,
    GGML_TYPE_Q4_2,
    GGML_TYPE_Q5_0,
    GGML_TYPE_Q5_1,
    GGML_TYPE_Q8_0,
    LEGACY_TYPE_BLOCK,
    QK,
    TYPE_BLOCK,
    TYPE_NAMES,
)

F32 = np.float32


def _blocks(x: np.ndarray, qk: int = QK) -> np.ndarray:
    """View a 1-D float32 array as (n_blocks, qk)."""
    x = np.ascontiguousarray(x, dtype=F32).reshape(-1)
    if x.size % qk:
        raise ValueError(f"length {x.size} is not a multiple of the block size {qk}")
    return x.reshape(-1, qk)


def _inv(d: np.ndarray) -> np.ndarray:
    """1/d in float32, 0 where d == 0 (as `d ? 1.0f/d : 0.0f`)."""
    out = np.zeros_like(d)
    np.divide(F32(1.0), d, out=out, where=d != 0)
    return out


def _signed_absmax(b: np.ndarray) -> np.ndarray:
    """Per block, the value of largest magnitude (the first on ties; +0.0 for an all-zero block)."""
    idx = np.argmax(np.abs(b), axis=1)
    m = b[np.arange(b.shape[0]), idx]
    return np.where(np.abs(m) > 0, m, F32(0.0)).astype(F32)


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 (n,) -> (n, 2) uint8 of little-endian fp16."""
    return v.astype("<f2").view(np.uint8).reshape(-1, 2)


def _pack_halves(q: np.ndarray) -> np.ndarray:
    """(n, 32) values 0..15 -> (n, 16) bytes: low nibble = weights 0..15, high = 16..31."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _unpack_halves(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) nibble values."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _pack_pairs(q: np.ndarray) -> np.ndarray:
    """(n, k) values 0..15 -> (n, k/2) bytes, byte j = weight 2j (low) | weight 2j+1 (high)."""
    q = q.astype(np.uint8)
    return (q[:, 0::2] & 0x0F) | ((q[:, 1::2] & 0x0F) << 4)


def _unpack_pairs(qs: np.ndarray) -> np.ndarray:
    """(n, k/2) bytes -> (n, k) nibble values in pair order."""
    return np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(qs.shape[0], -1)


def _qh_bytes(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit values -> (n, 4) bytes of the little-endian uint32 of fifth bits."""
    bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4)


def _qh_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes -> (n, 32) fifth bits (0/1) as uint8."""
    word = np.ascontiguousarray(qh).view("<u4").reshape(-1, 1)
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (halves away from zero), exact in float32."""
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= F32(0.5), np.sign(v), F32(0.0)).astype(F32)


def _trunc_int(v: np.ndarray) -> np.ndarray:
    """C (int) cast of float32: truncation toward zero."""
    return np.trunc(v).astype(np.int32)


def _q_min_scale(b: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q4_1/q5_1 common part: (min, d, id) per block."""
    rows = np.arange(b.shape[0])
    mn = b[rows, np.argmin(b, axis=1)]  # the first minimum, as the C loop keeps it (-0.0 vs 0.0)
    mx = b[rows, np.argmax(b, axis=1)]
    d = ((mx - mn) / F32(levels)).astype(F32)
    return mn, d, _inv(d)


def _quantize_blocks(b: np.ndarray, ggml_type: int) -> np.ndarray:
    """(n, 32) float32 -> (n, bytes_per_block) uint8, current layout."""
    if ggml_type == GGML_TYPE_Q4_0:
        d = (_signed_absmax(b) / F32(-8)).astype(F32)
        q = np.minimum(15, _trunc_int(b * _inv(d)[:, None] + F32(8.5)))
        return np.concatenate([_fp16_bytes(d), _pack_halves(q)], axis=1)
    if ggml_type == GGML_TYPE_Q4_1:
        mn, d, inv = _q_min_scale(b, 15)
        q = np.minimum(15, _trunc_int((b - mn[:, None]) * inv[:, None] + F32(0.5)))
        return np.concatenate([_fp16_bytes(d), _fp16_bytes(mn), _pack_halves(q)], axis=1)
    if ggml_type == GGML_TYPE_Q5_0:
        d = (_signed_absmax(b) / F32(-16)).astype(F32)
        q = np.minimum(31, _trunc_int(b * _inv(d)[:, None] + F32(16.5)))
        return np.concatenate([_fp16_bytes(d), _qh_bytes(q), _pack_halves(q)], axis=1)
    if ggml_type == GGML_TYPE_Q5_1:
        mn, d, inv = _q_min_scale(b, 31)
        q = _trunc_int((b - mn[:, None]) * inv[:, None] + F32(0.5)) & 0xFF  # (uint8) cast
        return np.concatenate([_fp16_bytes(d), _fp16_bytes(mn), _qh_bytes(q), _pack_halves(q)], axis=1)
    if ggml_type == GGML_TYPE_Q8_0:
        d = (np.abs(b).max(axis=1) / F32(127)).astype(F32)
        q = _roundf(b * _inv(d)[:, None]).astype(np.int8).view(np.uint8)
        return np.concatenate([_fp16_bytes(d), q], axis=1)
    raise ValueError(f"unsupported ggml type {ggml_type}")


def _check_type(ggml_type: int, table: dict[int, tuple[int, int]]) -> tuple[int, int]:
    if ggml_type not in table:
        raise ValueError(f"unsupported ggml type {ggml_type}")
    return table[ggml_type]


def quantize(x: np.ndarray, ggml_type: int) -> bytes:
    """Encode a 1-D float array as ggml tensor data of `ggml_type` (current layout)."""
    _check_type(ggml_type, TYPE_BLOCK)
    flat = np.ascontiguousarray(x, dtype=F32).reshape(-1)
    if ggml_type == GGML_TYPE_F32:
        return flat.astype("<f4").tobytes()
    if ggml_type == GGML_TYPE_F16:
        return flat.astype("<f2").tobytes()
    return _quantize_blocks(_blocks(flat), ggml_type).tobytes()


def _split(raw: np.ndarray, widths: list[int]) -> list[np.ndarray]:
    out, pos = [], 0
    for w in widths:
        out.append(raw[:, pos : pos + w])
        pos += w
    return out


def _f16(col: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32 from little-endian fp16."""
    return np.ascontiguousarray(col).view("<f2").astype(F32).reshape(-1, 1)


def _f32(col: np.ndarray) -> np.ndarray:
    """(n, 4) uint8 -> (n, 1) float32 from little-endian f32."""
    return np.ascontiguousarray(col).view("<f4").astype(F32).reshape(-1, 1)


def _raw(data: bytes | bytearray | memoryview | np.ndarray, nbytes: int) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    buf = buf.reshape(-1)
    if buf.size < nbytes:
        raise ValueError(f"need {nbytes} bytes of tensor data, got {buf.size}")
    return buf[:nbytes]


def dequantize(data: bytes | bytearray | memoryview | np.ndarray, ggml_type: int, n: int) -> np.ndarray:
    """Decode `n` weights of `ggml_type` tensor data (current layout) to float32."""
    qk, size = _check_type(ggml_type, TYPE_BLOCK)
    raw = _raw(data, bytes_per_row(ggml_type, n))
    if ggml_type == GGML_TYPE_F32:
        return raw.view("<f4").astype(F32)
    if ggml_type == GGML_TYPE_F16:
        return raw.view("<f2").astype(F32)
    raw = raw.reshape(-1, size)
    if ggml_type == GGML_TYPE_Q4_0:
        d, qs = _split(raw, [2, 16])
        return ((_unpack_halves(qs).astype(F32) - F32(8)) * _f16(d)).reshape(-1)
    if ggml_type == GGML_TYPE_Q4_1:
        d, m, qs = _split(raw, [2, 2, 16])
        return (_unpack_halves(qs).astype(F32) * _f16(d) + _f16(m)).reshape(-1)
    if ggml_type == GGML_TYPE_Q5_0:
        d, qh, qs = _split(raw, [2, 4, 16])
        q = _unpack_halves(qs) | (_qh_bits(qh) << 4)
        return ((q.astype(F32) - F32(16)) * _f16(d)).reshape(-1)
    if ggml_type == GGML_TYPE_Q5_1:
        d, m, qh, qs = _split(raw, [2, 2, 4, 16])
        q = _unpack_halves(qs) | (_qh_bits(qh) << 4)
        return (q.astype(F32) * _f16(d) + _f16(m)).reshape(-1)
    d, qs = _split(raw, [2, 32])  # q8_0
    return (np.ascontiguousarray(qs).view(np.int8).astype(F32) * _f16(d)).reshape(-1)


def bytes_per_row(ggml_type: int, n: int) -> int:
    """Bytes taken by `n` consecutive weights of `ggml_type` (current layout)."""
    qk, size = _check_type(ggml_type, TYPE_BLOCK)
    if n < 0 or n % qk:
        raise ValueError(f"{TYPE_NAMES.get(ggml_type, ggml_type)} needs a multiple of {qk} weights, got {n}")
    return n // qk * size


def legacy_bytes_per_row(ggml_type: int, n: int) -> int:
    """Bytes taken by `n` weights of `ggml_type` in the pre-May-2023 layout."""
    qk, size = _check_type(ggml_type, LEGACY_TYPE_BLOCK)
    if n < 0 or n % qk:
        raise ValueError(f"legacy {TYPE_NAMES.get(ggml_type, ggml_type)} needs a multiple of {qk} weights, got {n}")
    return n // qk * size


def quantize_legacy(x: np.ndarray, ggml_type: int) -> bytes:
    """Encode float weights in the pre-May-2023 (GPT4All-J era) layout of q4_0/q4_1/q4_2/q8_0."""
    if ggml_type in (GGML_TYPE_F32, GGML_TYPE_F16):
        return quantize(x, ggml_type)
    if ggml_type == GGML_TYPE_Q4_0:  # April 2023: d = amax / 7, q = roundf(x/d) + 8
        b = _blocks(x)
        d = (np.abs(b).max(axis=1) / F32(7)).astype(F32)
        q = _roundf(b * _inv(d)[:, None]).astype(np.int32) + 8
        parts = [d.astype("<f4").view(np.uint8).reshape(-1, 4), _pack_pairs(q)]
    elif ggml_type == GGML_TYPE_Q4_1:
        b = _blocks(x)
        mn, d, inv = _q_min_scale(b, 15)
        q = _roundf((b - mn[:, None]) * inv[:, None]).astype(np.int32)
        parts = [d.astype("<f4").view(np.uint8).reshape(-1, 4), mn.astype("<f4").view(np.uint8).reshape(-1, 4)]
        parts.append(_pack_pairs(q))
    elif ggml_type == GGML_TYPE_Q4_2:  # blocks of 16, fp16 d
        b = _blocks(x, 16)
        d = (_signed_absmax(b) / F32(-8)).astype(F32)
        q = np.minimum(15, _trunc_int(b * _inv(d)[:, None] + F32(8.5)))
        parts = [_fp16_bytes(d), _pack_pairs(q)]
    elif ggml_type == GGML_TYPE_Q8_0:
        b = _blocks(x)
        d = (np.abs(b).max(axis=1) / F32(127)).astype(F32)
        q = _roundf(b * _inv(d)[:, None]).astype(np.int8).view(np.uint8)
        parts = [d.astype("<f4").view(np.uint8).reshape(-1, 4), q]
    else:
        raise ValueError(f"no legacy quantizer for ggml type {ggml_type}")
    return np.concatenate(parts, axis=1).tobytes()


def dequantize_legacy(data: bytes | bytearray | memoryview | np.ndarray, ggml_type: int, n: int) -> np.ndarray:
    """Decode `n` weights stored in the pre-May-2023 layout (q4_0/q4_1/q4_2/q8_0, f32, f16)."""
    if ggml_type in (GGML_TYPE_F32, GGML_TYPE_F16):
        return dequantize(data, ggml_type, n)
    qk, size = _check_type(ggml_type, LEGACY_TYPE_BLOCK)
    raw = _raw(data, legacy_bytes_per_row(ggml_type, n)).reshape(-1, size)
    if ggml_type == GGML_TYPE_Q4_0:
        d, qs = _split(raw, [4, 16])
        return ((_unpack_pairs(qs).astype(F32) - F32(8)) * _f32(d)).reshape(-1)
    if ggml_type == GGML_TYPE_Q4_1:
        d, m, qs = _split(raw, [4, 4, 16])
        return (_unpack_pairs(qs).astype(F32) * _f32(d) + _f32(m)).reshape(-1)
    if ggml_type == GGML_TYPE_Q4_2:
        d, qs = _split(raw, [2, 8])
        return ((_unpack_pairs(qs).astype(F32) - F32(8)) * _f16(d)).reshape(-1)
    if ggml_type == GGML_TYPE_Q8_0:
        d, qs = _split(raw, [4, 32])
        return (np.ascontiguousarray(qs).view(np.int8).astype(F32) * _f32(d)).reshape(-1)
    raise ValueError(f"no legacy dequantizer for ggml type {ggml_type}")
