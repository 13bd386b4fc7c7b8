"""Quantizers of backends.ggml.quants: exact bytes, error bounds, agreement with ggml's reference loops.

Error bounds (per block of 32; d is the float32 scale the quantizer computes, d16 = fp16(d) the
stored one, |d - d16| <= 2^-11 |d| + 2^-25 (fp16 rounding, incl. subnormals); q the integer level):

- q4_0: d = m/-8 (m = value of largest magnitude). x/d lies in [-8, 8]; levels -8..7 after the
  `min(15, ...)` clip, so |x - (q-8)d| <= |d|/2 except on the clipped side (x/d > 7.5) where it is
  <= |d| = amax/8. Storage adds |q-8| |d - d16| <= 8 |d - d16|.
- q5_0: same with 16 levels per side: <= |d|/2, or <= |d| = amax/16 on the clipped side; + 16 |d - d16|.
- q8_0: d = amax/127, q = roundf(x/d) in [-127, 127]: <= d/2, + 127 |d - d16|.
- q4_1 / q5_1: d = (max - min)/L with L = 15 / 31, q = floor((x - min)/d + 0.5) in [0, L]:
  <= d/2, + L |d - d16| + |min - fp16(min)|.
- f16: relative 2^-11 (plus 2^-25 absolute for subnormals); f32: exact.
Every bound also allows a few float32 ulps of the block's magnitude for the x*id products.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from backends.ggml.constants import (
    GGML_TYPE_F16,
    GGML_TYPE_F32,
    GGML_TYPE_Q4_0,
    GGML_TYPE_Q4_1,
    GGML_TYPE_Q4_2,
    GGML_TYPE_Q5_0,
    GGML_TYPE_Q5_1,
    GGML_TYPE_Q8_0,
    LEGACY_TYPE_BLOCK,
    TYPE_BLOCK,
)
from backends.ggml.quants import (
    bytes_per_row,
    dequantize,
    dequantize_legacy,
    legacy_bytes_per_row,
    quantize,
    quantize_legacy,
)

F = np.float32
QUANT_TYPES = [GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q8_0]
ALL_TYPES = [GGML_TYPE_F32, GGML_TYPE_F16, *QUANT_TYPES]


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


# ---------------------------------------------------------------- known vectors (hand-computed)

# q4_0, x_j = j - 16: m = -16 (j = 0), d = 2, q_j = trunc(x_j/2 + 8.5) = (j+1)//2, clipped to 15.
Q4_0_RAMP = (np.arange(32) - 16, "0040 8091 91a2 a2b3 b3c4 c4d5 d5e6 e6f7 f7f8")
# q4_1, min 1.5, d = 1: q_j = j (j < 16), 31 - j (j >= 16), but x_1 = 3.0 (2.5 above min) rounds up to 2.
_q41 = np.array([*range(16), *range(15, -1, -1)], dtype=np.float64) + 1.5
_q41[1] = 3.0
Q4_1_VEC = (_q41, "003c 003e f0e2 d2c3 b4a5 9687 7869 5a4b 3c2d 1e0f")
# q5_0, d = 1 (m = -16): levels q_j = 2j (j < 16), 2(j-16)+1 (j >= 16); x = q - 16.
_q5 = np.array([2 * j for j in range(16)] + [2 * j + 1 for j in range(16)], dtype=np.float64)
_Q5_QS = "1032 5476 98ba dcfe" * 2
Q5_0_VEC = (_q5 - 16, "003c 00ff00ff" + _Q5_QS)  # fifth bits of weights 8..15 and 24..31
# q5_1, the same levels with min 0.25, d = 0.5.
Q5_1_VEC = (0.25 + 0.5 * _q5, "0038 0034 00ff00ff" + _Q5_QS)
# q8_0, amax 127 so d = 1; roundf rounds halves away from zero (2.5 -> 3, -0.5 -> -1).
_q8 = np.array([127, -127, 2.5, -2.5, 0.49, -0.5, 1.4999, *range(-9, 16)], dtype=np.float64)
Q8_0_VEC = (_q8, "003c 7f81 03fd 00ff 01" + "f7f8f9fafbfcfdfeff00" + "0102030405060708090a0b0c0d0e0f")


@pytest.mark.parametrize(
    "ggml_type,vec",
    [
        (GGML_TYPE_Q4_0, Q4_0_RAMP),
        (GGML_TYPE_Q4_1, Q4_1_VEC),
        (GGML_TYPE_Q5_0, Q5_0_VEC),
        (GGML_TYPE_Q5_1, Q5_1_VEC),
        (GGML_TYPE_Q8_0, Q8_0_VEC),
    ],
    ids=["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"],
)
def test_known_block_bytes(ggml_type, vec):
    x, hexbytes = vec
    assert quantize(np.asarray(x, dtype=F), ggml_type) == h(hexbytes)


def test_known_dequantized_values():
    np.testing.assert_array_equal(dequantize(h(Q4_0_RAMP[1]), GGML_TYPE_Q4_0, 32), [2 * ((j + 1) // 2) - 16 if j < 31 else 14 for j in range(32)])
    np.testing.assert_array_equal(dequantize(h(Q5_0_VEC[1]), GGML_TYPE_Q5_0, 32), Q5_0_VEC[0])
    np.testing.assert_array_equal(dequantize(h(Q5_1_VEC[1]), GGML_TYPE_Q5_1, 32), Q5_1_VEC[0])
    expect8 = np.array([127, -127, 3, -3, 0, -1, 1, *range(-9, 16)])
    np.testing.assert_array_equal(dequantize(h(Q8_0_VEC[1]), GGML_TYPE_Q8_0, 32), expect8)


def test_q4_0_scale_sign_follows_first_largest_magnitude():
    # m = +3 (first of +-3): d = -0.375 (fp16 0xb600); -3 maps to level 16, clipped to 15 -> -2.625.
    x = np.zeros(32, F)
    x[0], x[1] = 3, -3
    data = quantize(x, GGML_TYPE_Q4_0)
    assert data[:2] == h("00b6") and data[2] == 0x80 and data[3] == 0x8F
    np.testing.assert_array_equal(dequantize(data, GGML_TYPE_Q4_0, 32)[:2], [3, -2.625])
    x[0], x[1] = -3, 3
    data = quantize(x, GGML_TYPE_Q4_0)
    assert data[:2] == h("0036")
    np.testing.assert_array_equal(dequantize(data, GGML_TYPE_Q4_0, 32)[:2], [-3, 2.625])


@pytest.mark.parametrize(
    "ggml_type,hexbytes",
    [
        (GGML_TYPE_Q4_0, "0080" + "88" * 16),  # d = 0/-8 = -0.0; level 8
        (GGML_TYPE_Q4_1, "0000 0000" + "00" * 16),
        (GGML_TYPE_Q5_0, "0080 ffffffff" + "00" * 16),  # level 16: fifth bit set everywhere
        (GGML_TYPE_Q5_1, "0000 0000 00000000" + "00" * 16),
        (GGML_TYPE_Q8_0, "0000" + "00" * 32),
    ],
    ids=["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"],
)
def test_all_zero_block(ggml_type, hexbytes):
    data = quantize(np.zeros(32, F), ggml_type)
    assert data == h(hexbytes)
    assert not np.any(dequantize(data, ggml_type, 32))


# ---------------------------------------------------------------- scalar transcription of ggml.c


def _fp16(v) -> bytes:
    return np.array([v], dtype="<f2").tobytes()


def _ref_block(x: np.ndarray, t: int) -> bytes:
    """One block through a literal, element-by-element transcription of quantize_row_*_reference."""
    x = [F(v) for v in x]
    if t in (GGML_TYPE_Q4_0, GGML_TYPE_Q5_0):
        amax, mx = F(0), F(0)
        for v in x:
            if amax < abs(v):
                amax, mx = abs(v), v
        d = F(mx / F(-8 if t == GGML_TYPE_Q4_0 else -16))
        inv = F(F(1) / d) if d else F(0)
        top, off = (15, F(8.5)) if t == GGML_TYPE_Q4_0 else (31, F(16.5))
        q = [min(top, int(F(F(v * inv) + off))) for v in x]
        head = _fp16(d)
    elif t in (GGML_TYPE_Q4_1, GGML_TYPE_Q5_1):
        mn, mx = F(np.finfo(F).max), F(-np.finfo(F).max)
        for v in x:
            mn, mx = min(mn, v), max(mx, v)
        levels = 15 if t == GGML_TYPE_Q4_1 else 31
        d = F(F(mx - mn) / F(levels))
        inv = F(F(1) / d) if d else F(0)
        q = [int(F(F(F(v - mn) * inv) + F(0.5))) for v in x]
        if t == GGML_TYPE_Q4_1:
            q = [min(15, v) for v in q]
        head = _fp16(d) + _fp16(mn)
    else:  # q8_0
        amax = F(0)
        for v in x:
            amax = max(amax, abs(v))
        d = F(amax / F(127))
        inv = F(F(1) / d) if d else F(0)
        q = []
        for v in x:
            p = float(F(v * inv))
            r = np.floor(abs(p) + 0.5) if abs(p) % 1 != 0.5 else abs(p) + 0.5  # C roundf (exact in float64)
            q.append(int(np.copysign(r, p)))
        return _fp16(d) + np.array(q, dtype=np.int8).tobytes()
    qs = bytes((q[j] & 15) | ((q[j + 16] & 15) << 4) for j in range(16))
    if t in (GGML_TYPE_Q5_0, GGML_TYPE_Q5_1):
        qh = sum(((q[j] >> 4) & 1) << j for j in range(32))
        head += qh.to_bytes(4, "little")
    return head + qs


finite32 = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
special = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 7.5, -8.0, 1e-6, -1e-7, 3e-8])
blocks = hnp.arrays(F, st.integers(1, 4).map(lambda k: 32 * k), elements=st.one_of(finite32, special))
scales = st.sampled_from([1.0, 1e-3, 1e-6, 10.0])


def _scaled(x: np.ndarray, scale: float) -> np.ndarray:
    """x * scale, flushing magnitudes below 1e-20 to 0: with a (near-)subnormal block scale 1/d
    overflows to inf, in ggml as here, and the block's levels are undefined."""
    x = (x * F(scale)).astype(F)
    return np.where(np.abs(x) < 1e-20, x * F(0), x).astype(F)  # keeps the sign of zeros


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(x=blocks, scale=scales, t=st.sampled_from(QUANT_TYPES))
def test_vectorized_matches_reference_loop(x, scale, t):
    x = _scaled(x, scale)
    expected = b"".join(_ref_block(b, t) for b in x.reshape(-1, 32))
    assert quantize(x, t) == expected


def _bound(x: np.ndarray, t: int) -> np.ndarray:
    """Per-element error bound (see module docstring)."""
    b = x.reshape(-1, 32).astype(np.float64)
    amax = np.abs(b).max(axis=1, keepdims=True)
    ulps = 8 * np.finfo(F).eps * amax
    fp16_err = lambda v: np.abs(v) * 2.0**-11 + 2.0**-25  # noqa: E731
    if t in (GGML_TYPE_Q4_0, GGML_TYPE_Q5_0):
        half = 8 if t == GGML_TYPE_Q4_0 else 16
        idx = np.argmax(np.abs(b), axis=1)
        m = b[np.arange(len(b)), idx][:, None]
        d = np.abs(m) / half
        clipped = np.where(d > 0, -b / np.where(m == 0, 1, m) * half > half - 0.5, False)
        bound = np.where(clipped, d, d / 2) + half * fp16_err(d)
    elif t in (GGML_TYPE_Q4_1, GGML_TYPE_Q5_1):
        levels = 15 if t == GGML_TYPE_Q4_1 else 31
        mn, mx = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
        d = (mx - mn) / levels
        bound = d / 2 + levels * fp16_err(d) + fp16_err(mn)
        ulps = 8 * np.finfo(F).eps * np.maximum(amax, mx - mn)
    else:
        d = amax / 127
        bound = d / 2 + 127 * fp16_err(d)
    return np.broadcast_to(bound + ulps, b.shape).reshape(-1)


@SETTINGS
@given(x=blocks, scale=scales, t=st.sampled_from(QUANT_TYPES))
def test_roundtrip_within_bound(x, scale, t):
    x = _scaled(x, scale)
    data = quantize(x, t)
    assert len(data) == bytes_per_row(t, x.size)
    y = dequantize(data, t, x.size)
    assert y.dtype == np.float32 and y.shape == x.shape
    err = np.abs(y.astype(np.float64) - x)
    assert np.all(err <= _bound(x, t)), f"max excess {np.max(err - _bound(x, t))}"


def test_q4_0_bound_is_tight_on_clipped_side():
    # x = -m (opposite sign, same magnitude) lands on level 16 and is clipped to 15: error exactly |d|.
    x = np.zeros(32, F)
    x[0], x[5] = -4, 4
    y = dequantize(quantize(x, GGML_TYPE_Q4_0), GGML_TYPE_Q4_0, 32)
    assert y[0] == -4 and y[5] == 3.5  # d = 0.5


@SETTINGS
@given(x=hnp.arrays(F, st.integers(0, 70), elements=finite32))
def test_f32_exact_f16_relative(x):
    assert np.array_equal(dequantize(quantize(x, GGML_TYPE_F32), GGML_TYPE_F32, x.size), x)
    y = dequantize(quantize(x, GGML_TYPE_F16), GGML_TYPE_F16, x.size)
    assert np.all(np.abs(y - x) <= np.abs(x) * 2.0**-11 + 2.0**-25)


@pytest.mark.parametrize("t", ALL_TYPES)
def test_deterministic_and_sizes(t):
    x = np.random.default_rng(5).standard_normal(4096).astype(F)
    a, b = quantize(x, t), quantize(x.copy(), t)
    assert a == b
    qk, size = TYPE_BLOCK[t]
    assert len(a) == 4096 // qk * size == bytes_per_row(t, 4096)


def test_bytes_per_row_and_errors():
    assert [bytes_per_row(t, 64) for t in ALL_TYPES] == [256, 128, 36, 40, 44, 48, 68]
    with pytest.raises(ValueError, match="multiple of 32"):
        bytes_per_row(GGML_TYPE_Q4_0, 48)
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize(np.zeros(48, F), GGML_TYPE_Q8_0)
    with pytest.raises(ValueError, match="unsupported ggml type"):
        quantize(np.zeros(32, F), 5)
    with pytest.raises(ValueError, match="need 36 bytes"):
        dequantize(b"\0" * 35, GGML_TYPE_Q4_0, 64)


def test_whole_tensor_is_fast():
    x = np.random.default_rng(0).standard_normal(1 << 20).astype(F)
    import time

    t0 = time.perf_counter()
    for t in QUANT_TYPES:
        dequantize(quantize(x, t), t, x.size)
    assert time.perf_counter() - t0 < 5.0


# ---------------------------------------------------------------- legacy (pre-May-2023) layout


def test_legacy_q4_0_known_block_pairs_layout():
    # amax 7 -> d = 1 (f32 0x3f800000); q = roundf(x) + 8; byte k = q_2k | q_(2k+1) << 4.
    x = np.array([7, -7, *[(j % 8) - 4 for j in range(2, 32)]], dtype=F)
    data = quantize_legacy(x, GGML_TYPE_Q4_0)
    assert data == h("0000803f 1f76 98ba" + "5476 98ba" * 3)
    np.testing.assert_array_equal(dequantize_legacy(data, GGML_TYPE_Q4_0, 32), x)


@pytest.mark.parametrize("t", [GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q4_2, GGML_TYPE_Q8_0])
def test_legacy_roundtrip(t):
    x = np.random.default_rng(1).standard_normal(1024).astype(F)
    data = quantize_legacy(x, t)
    qk, size = LEGACY_TYPE_BLOCK[t]
    assert len(data) == 1024 // qk * size == legacy_bytes_per_row(t, 1024)
    y = dequantize_legacy(data, t, 1024)
    b = np.abs(x.reshape(-1, qk)).max(axis=1, keepdims=True)
    step = {GGML_TYPE_Q4_0: b / 7, GGML_TYPE_Q4_1: 2 * b / 15, GGML_TYPE_Q4_2: b / 8, GGML_TYPE_Q8_0: b / 127}[t]
    assert np.all(np.abs(y - x).reshape(-1, qk) <= step * (1.0 if t == GGML_TYPE_Q4_2 else 0.5) * 1.01 + 1e-6)
