"""A plain numpy forward pass of GPT-J, for checking what the engine computes.

Written from the model's definition (Wang & Komatsuzaki's GPT-J / Hugging Face ``GPTJModel``):

* token embedding ``transformer.wte.weight`` (no position embedding);
* per layer, ONE LayerNorm (``ln_1``, eps 1e-5) whose output feeds attention and MLP in parallel:
  ``x = x + attn(ln_1(x)) + mlp(ln_1(x))``;
* attention: q/k/v projections without bias; rotary position embedding on the first ``n_rot``
  dims of every head, pairs interleaved (``rotate_every_two``: dims (0,1), (2,3), ...), pair ``i``
  turned by ``pos * 10000 ** (-2i / n_rot)``; causal softmax of ``q.k / sqrt(head_dim)``;
  ``out_proj`` without bias;
* MLP: ``fc_in`` (+bias) -> GELU (tanh approximation) -> ``fc_out`` (+bias);
* final LayerNorm ``ln_f``, then ``lm_head`` with bias.

Weights are numpy arrays shaped ``(rows, row_len)``, i.e. ``[out_features, in_features]`` like
PyTorch's ``nn.Linear.weight``; ``y = x @ W.T + b``.

``rope="ggml"`` reproduces one known deviation of the ggml bundled with ctransformers 0.2.27:
its rope mode 0 loops over the WHOLE head, so the dims past ``n_rot`` are turned as well, with
the frequency sequence simply continued (pair ``i`` -> ``10000 ** (-2i / n_rot)`` for every
``i < head_dim / 2``). With ``n_rot == head_dim`` both modes are identical.

Two ways to include ctransformers 0.2.27's own rounding (its bundled ggml, ``lib="avx2"``):

``forward(..., ggml_f16=True)`` adds, to the float64 model, the f16 roundings ggml makes even
with f32 weights: the KV cache is f16 (K after rotary, V), Q is converted to f16 for the K.Q
product, softmax takes ``exp`` from an f16 table (argument and result rounded to f16), the
probabilities are converted to f16 for the product with V, and GELU is an f16 table (argument and
result rounded to f16). With f16 weights (``weight_type="f16"``, or ``hparams["ftype"] == 1``)
it also rounds the input of every weight matmul to f16 (q/k/v, out_proj, fc_in, fc_out,
lm_head): ``ggml_compute_forward_mul_mat`` converts the f32 rows of src1 to src0's
``vec_dot_type``, f16 for an f16 src0 (``ggml_fp32_to_fp16_row``), before ``ggml_vec_dot_f16``.
Quantized weights quantize those activations to q8_0/q8_1 instead; that is not emulated
(``ggml_f16=True`` with a quantized weight type is an error). Each f16 rounding decision is only
reproduced if the value before it agrees with the engine's f32 value to well under an f16 ulp;
float64 does not guarantee that near a rounding tie, and one flipped decision perturbs everything
downstream by ~1 f16 ulp, which makes later flips likely. With f32 weights (few rounding points)
this lands within ~1e-6..6e-4 of the engine; with f16 weights (an f16 rounding before every
matmul) it cascades and is often no closer than the clean model (~1-2e-3 on the test models).

``forward_ggml`` is therefore an op-for-op float32 replica of ctransformers' ``gptj_eval`` on
x86-64 with AVX2/FMA/F16C (f32 and f16 weights): ggml's layer norm (double sums), the
AVX2 ``ggml_vec_dot_f32``/``ggml_vec_dot_f16`` accumulation order (4 x 8 lanes, FMA, the same
reduction tree, scalar double leftovers), rope mode 0 with ``powf``/``sinf``/``cosf`` and the
f32 ``theta *= theta_scale`` recurrence, the exp and GELU f16 tables built with libm's
``expf``/``tanhf`` (GELU's ``1 + a*x*x`` contracted to an FMA, as GCC does with ``-mfma``), and
the engine's order of additions. On the test models it reproduces the engine's logits bit for
bit. Being written after ``gptj_eval``, it shows that the engine differs from ``forward``
by rounding and nothing else; that the model is GPT-J is what the comparison with ``forward`` shows.

``ggml_f16=False`` (the default) is the clean float64 GPT-J, whatever the weight type.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import numpy as np

LN_EPS = 1e-5
ROPE_BASE = 10000.0


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = LN_EPS) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased variance, as torch
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def rotary(x: np.ndarray, positions: np.ndarray, n_rot: int, *, mode: str = "gptj") -> np.ndarray:
    """Apply GPT-J rotary embedding to ``x`` shaped [seq, n_head, head_dim]."""
    head_dim = x.shape[-1]
    if n_rot % 2 or n_rot > head_dim:
        raise ValueError(f"n_rot {n_rot} must be even and <= head_dim {head_dim}")
    if mode == "gptj":
        n_turned = n_rot
    elif mode == "ggml":
        n_turned = head_dim - head_dim % 2
    else:
        raise ValueError(f"unknown rope mode {mode!r}")
    pair = np.arange(n_turned // 2, dtype=np.float64)
    inv_freq = ROPE_BASE ** (-2.0 * pair / n_rot)  # [n_turned/2]
    theta = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # [seq, n_turned/2]
    cos = np.cos(theta)[:, None, :]  # broadcast over heads
    sin = np.sin(theta)[:, None, :]
    out = x.copy()
    even = x[..., 0:n_turned:2]
    odd = x[..., 1:n_turned:2]
    out[..., 0:n_turned:2] = even * cos - odd * sin
    out[..., 1:n_turned:2] = odd * cos + even * sin
    return out


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(x.dtype)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


# GGML file-type codes (ftype % 1000; the thousands carry the quantization version).
_FTYPE_WEIGHT_TYPES = {0: "f32", 1: "f16"}


def _weight_type(hparams: dict, weight_type: str | None) -> str:
    """"f32", "f16" or "quantized": the type of the 2-D weight matrices."""
    if weight_type is None:
        ftype = hparams.get("ftype")
        if ftype is None:
            return "f32"
        return _FTYPE_WEIGHT_TYPES.get(int(ftype) % 1000, "quantized")
    if weight_type not in ("f32", "f16", "quantized"):
        raise ValueError(f"weight_type must be 'f32', 'f16' or 'quantized', got {weight_type!r}")
    return weight_type


def _linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y


def forward(
    tensors: dict[str, np.ndarray],
    hparams: dict,
    tokens: list[int],
    *,
    rope: str = "gptj",
    ggml_f16: bool = False,
    weight_type: str | None = None,
    dtype=np.float64,
    hidden: bool = False,
) -> np.ndarray:
    """Logits for every position: array [len(tokens), n_vocab] (with ``hidden=True``: the final hidden
    states, after ``ln_f`` and before ``lm_head``, array [len(tokens), n_embd]).

    ``tensors`` maps the Hugging Face GPT-J state-dict names to arrays shaped (rows, row_len);
    ``hparams`` needs n_vocab, n_embd, n_head, n_layer, n_rot. ``weight_type`` ("f32", "f16" or
    "quantized") only matters with ``ggml_f16=True``; by default it is taken from
    ``hparams["ftype"]`` (as ``read_hparams`` returns it), or "f32" if there is none.
    """
    n_vocab = int(hparams["n_vocab"])
    n_embd = int(hparams["n_embd"])
    n_head = int(hparams["n_head"])
    n_layer = int(hparams["n_layer"])
    n_rot = int(hparams["n_rot"])
    if n_embd % n_head:
        raise ValueError("n_embd must be a multiple of n_head")
    head_dim = n_embd // n_head
    wtype = _weight_type(hparams, weight_type)
    if ggml_f16 and wtype == "quantized":
        raise ValueError("ggml_f16=True emulates f32 and f16 weights only (q8 activations are not emulated)")

    def t(name: str) -> np.ndarray:
        return np.asarray(tensors[name], dtype=dtype)

    ids = np.asarray(tokens, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError("tokens must be a non-empty list of ids")
    if ids.min() < 0 or ids.max() >= n_vocab:
        raise ValueError("token id out of range")
    seq = ids.size
    positions = np.arange(seq)

    x = t("transformer.wte.weight")[ids]  # [seq, n_embd]
    causal = np.triu(np.ones((seq, seq), dtype=bool), k=1)  # True where key is in the future
    scale = 1.0 / np.sqrt(head_dim)
    r16 = _f16 if ggml_f16 else _identity
    # input of a matmul with a weight matrix: rounded to f16 when the weights are f16
    a16 = _f16 if ggml_f16 and wtype == "f16" else _identity

    for i in range(n_layer):
        p = f"transformer.h.{i}."
        h = layer_norm(x, t(p + "ln_1.weight"), t(p + "ln_1.bias"))
        h_in = a16(h)  # what the q/k/v and fc_in matmuls see

        # attention
        q = _linear(h_in, t(p + "attn.q_proj.weight")).reshape(seq, n_head, head_dim)
        k = _linear(h_in, t(p + "attn.k_proj.weight")).reshape(seq, n_head, head_dim)
        v = _linear(h_in, t(p + "attn.v_proj.weight")).reshape(seq, n_head, head_dim)
        q = r16(rotary(q, positions, n_rot, mode=rope))
        k = r16(rotary(k, positions, n_rot, mode=rope))
        v = r16(v)
        scores = np.einsum("qhd,khd->hqk", q, k) * scale  # [n_head, seq, seq]
        scores = np.where(causal[None], -np.inf, scores)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = r16(np.exp(r16(scores)))
        probs /= probs.sum(axis=-1, keepdims=True)
        ctx = np.einsum("hqk,khd->qhd", r16(probs), v).reshape(seq, n_embd)
        attn = _linear(a16(ctx), t(p + "attn.out_proj.weight"))

        # MLP, fed by the same layer norm output
        m = r16(gelu_tanh(r16(_linear(h_in, t(p + "mlp.fc_in.weight"), t(p + "mlp.fc_in.bias")))))
        mlp = _linear(a16(m), t(p + "mlp.fc_out.weight"), t(p + "mlp.fc_out.bias"))

        x = x + attn + mlp

    x = layer_norm(x, t("transformer.ln_f.weight"), t("transformer.ln_f.bias"))
    if hidden:
        return x
    return _linear(a16(x), t("lm_head.weight"), t("lm_head.bias"))


def pooled_embedding(tensors: dict[str, np.ndarray], hparams: dict, tokens: list[int], **kwargs) -> np.ndarray:
    """The embedding of a token sequence: the mean over its positions of GPT-J's final hidden states (after
    ``ln_f``, before ``lm_head``), L2-normalised; ``kwargs`` as ``forward``'s."""
    mean = forward(tensors, hparams, tokens, hidden=True, **kwargs).mean(axis=0)
    return mean / np.linalg.norm(mean)


# --------------------------------------------------------------------------------------------
# forward_ggml: ctransformers 0.2.27 (ggml, lib="avx2") arithmetic, op for op, in float32.
# --------------------------------------------------------------------------------------------

_F32 = np.float32


def _libm_f32():
    """libm's float functions (the ones ggml calls), or numpy stand-ins where libm is absent."""
    name = ctypes.util.find_library("m")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        lib = None
    funcs = {}
    for fn, nargs, fallback in (
        ("expf", 1, np.exp),
        ("tanhf", 1, np.tanh),
        ("sinf", 1, np.sin),
        ("cosf", 1, np.cos),
        ("powf", 2, np.power),
    ):
        f = getattr(lib, fn, None) if lib is not None else None
        if f is not None:
            f.restype = ctypes.c_float
            f.argtypes = [ctypes.c_float] * nargs
            funcs[fn] = lambda *a, f=f: _F32(f(*(float(v) for v in a)))
        else:  # float64 rounded to float32: differs from libm in rare last bits at most
            funcs[fn] = lambda *a, g=fallback: _F32(g(*(np.float64(v) for v in a)))
    return funcs


_LIBM = _libm_f32()


def _map_f32(fn: str, x: np.ndarray) -> np.ndarray:
    f = _LIBM[fn]
    return np.fromiter((f(v) for v in x.ravel()), dtype=_F32, count=x.size).reshape(x.shape)


def _fma32(a, b, c) -> np.ndarray:
    """float32 fused multiply-add: a*b is exact in float64, one final rounding to float32.

    (a*b + c can round in float64 first when the exponents are far apart; a double rounding that
    changes the float32 result needs a float64 sum exactly on a float32 midpoint: ~2**-29.)
    """
    return (np.asarray(a, np.float64) * b + c).astype(_F32)


@functools.lru_cache(maxsize=None)
def _ggml_tables() -> tuple[np.ndarray, np.ndarray]:
    """ggml's table_exp_f16 and table_gelu_f16 (ggml_init), indexed by the f16 bit pattern."""
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(_F32)
    with np.errstate(all="ignore"):  # inf/nan entries and overflow to f16 inf, as in ggml
        exp = _map_f32("expf", x)
        # 0.5f*x*(1.0f + tanhf(SQRT_2_OVER_PI*x*(1.0f + GELU_COEF_A*x*x))), 1 + a*x*x as an FMA
        inner = _F32(0.79788456080286535587989211986876) * x * _fma32(_F32(0.044715) * x, x, _F32(1.0))
        gelu = _F32(0.5) * x * (_F32(1.0) + _map_f32("tanhf", inner))
        return exp.astype(np.float16).astype(_F32), gelu.astype(np.float16).astype(_F32)


def _table(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    return table[x.astype(np.float16).view(np.uint16)]


def _ggml_mul_mat(w: np.ndarray, x: np.ndarray, wtype: str) -> np.ndarray:
    """ggml_mul_mat(w, x) for w [rows, n] (f32 or f16 values) and f32 x [m, n]: [m, rows] f32.

    As ggml_compute_forward_mul_mat with ggml_vec_dot_f32 / ggml_vec_dot_f16 on AVX2+FMA: x rows
    are converted to f16 for an f16 w; 4 accumulators of 8 lanes take 32 elements per step (FMA;
    for f16 the f16 x f16 products are exact in f32, so FMA = add); then
    GGML_F32x8_REDUCE ((a0+a2)+(a1+a3), high+low half, two hadds); then the n % 32 leftovers
    (f16: in double; f32: in float, contracted to FMA -- not exercised by the tests).
    """
    w = np.asarray(w, _F32)
    x = np.asarray(x, _F32)
    if wtype == "f16":
        x = x.astype(np.float16).astype(_F32)
    (rows, n), m = w.shape, x.shape[0]
    n_simd = n - n % 32
    acc = np.zeros((m, rows, 4, 8), _F32)
    for i in range(0, n_simd, 32):
        wb = w[None, :, i : i + 32].reshape(1, rows, 4, 8)
        xb = x[:, None, i : i + 32].reshape(m, 1, 4, 8)
        acc = acc + wb * xb if wtype == "f16" else _fma32(wb, xb, acc)
    a = acc[..., 0, :] + acc[..., 2, :]
    a = a + (acc[..., 1, :] + acc[..., 3, :])
    a = a[..., :4] + a[..., 4:]
    s = (a[..., 0] + a[..., 1]) + (a[..., 2] + a[..., 3])  # [m, rows]
    if n_simd < n:
        if wtype == "f16":
            d = s.astype(np.float64)
            for i in range(n_simd, n):
                d = d + (x[:, None, i] * w[None, :, i]).astype(np.float64)
            s = d.astype(_F32)
        else:
            for i in range(n_simd, n):
                s = _fma32(x[:, None, i], w[None, :, i], s)
    return s


def _ggml_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """ggml_norm (eps 1e-5f: double sums, f32 elsewhere), then * weight, then + bias."""
    n = x.shape[-1]
    mean = (x.astype(np.float64).sum(axis=-1, keepdims=True) / n).astype(_F32)
    v = x - mean
    variance = ((v * v).astype(np.float64).sum(axis=-1, keepdims=True) / n).astype(_F32)
    scale = _F32(1.0) / np.sqrt(variance + _F32(1e-5))
    return (v * scale) * np.asarray(weight, _F32) + np.asarray(bias, _F32)


def _ggml_rope(x: np.ndarray, n_rot: int) -> np.ndarray:
    """ggml rope mode 0 for x [seq, n_head, head_dim] at positions 0..seq-1 (whole head turned)."""
    seq, _, head_dim = x.shape
    with np.errstate(divide="ignore"):
        theta_scale = _LIBM["powf"](_F32(10000.0), _F32(-2.0) / _F32(n_rot))
    thetas = np.empty((seq, head_dim // 2), _F32)
    for pos in range(seq):
        theta = _F32(1.0) * _F32(pos)  # freq_scale * p
        for i in range(head_dim // 2):
            thetas[pos, i] = theta
            theta = _F32(theta * theta_scale)
    cos = _map_f32("cosf", thetas)[:, None, :]
    sin = _map_f32("sinf", thetas)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin  # (x*cos*zeta) with zeta = 1: no FMA can change these
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def forward_ggml(
    tensors: dict[str, np.ndarray],
    hparams: dict,
    tokens: list[int],
    *,
    weight_type: str | None = None,
    evals: list[int] | None = None,
) -> np.ndarray:
    """Logits [len(tokens), n_vocab] as ctransformers 0.2.27's gptj_eval computes them (float32).

    ``weight_type`` "f32" or "f16" (default from ``hparams["ftype"]``); ``evals`` are the sizes
    of the successive eval calls that fed ``tokens`` to the engine (default: one call). They
    matter because a position attends over n_past + N cache entries of its own call (masked
    ones with probability 0), and the length decides how ggml_vec_dot_f16 splits the K.Q / V
    products into 32-wide SIMD steps and leftovers.
    """
    wtype = _weight_type(hparams, weight_type)
    if wtype not in ("f32", "f16"):
        raise ValueError(f"forward_ggml replicates f32 and f16 weights only, not {wtype}")
    n_embd, n_head = int(hparams["n_embd"]), int(hparams["n_head"])
    n_layer, n_rot = int(hparams["n_layer"]), int(hparams["n_rot"])
    head_dim = n_embd // n_head
    seq = len(tokens)
    evals = [seq] if evals is None else list(evals)
    if sum(evals) != seq or min(evals) < 1:
        raise ValueError(f"evals {evals} do not add up to {seq} tokens")
    exp_table, gelu_table = _ggml_tables()
    scale = _F32(1.0) / np.sqrt(_F32(n_embd) / _F32(n_head))  # 1.0f/sqrt(float(n_embd)/n_head)

    def t(name: str) -> np.ndarray:
        return np.asarray(tensors[name], _F32)

    x = t("transformer.wte.weight")[np.asarray(tokens, dtype=np.int64)]
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        h = _ggml_norm(x, t(p + "ln_1.weight"), t(p + "ln_1.bias"))
        q = _ggml_rope(_ggml_mul_mat(t(p + "attn.q_proj.weight"), h, wtype).reshape(seq, n_head, head_dim), n_rot)
        k = _ggml_rope(_ggml_mul_mat(t(p + "attn.k_proj.weight"), h, wtype).reshape(seq, n_head, head_dim), n_rot)
        v = _ggml_mul_mat(t(p + "attn.v_proj.weight"), h, wtype).reshape(seq, n_head, head_dim)
        k, v = k.astype(np.float16).astype(_F32), v.astype(np.float16).astype(_F32)  # f16 KV cache

        ctx = np.empty((seq, n_head, head_dim), _F32)
        start = 0
        for n in evals:
            n_kv = start + n
            future = np.arange(n_kv)[None, :] > np.arange(start, n_kv)[:, None]  # diag_mask_inf
            for j in range(n_head):
                kq = _ggml_mul_mat(k[:n_kv, j], q[start:n_kv, j], "f16") * scale  # [n, n_kv]
                kq = np.where(future, -np.inf, kq).astype(_F32)
                with np.errstate(invalid="ignore"):
                    vals = np.where(future, _F32(0.0), _table(exp_table, kq - kq.max(axis=1, keepdims=True)))
                inv = (1.0 / vals.astype(np.float64).sum(axis=1, keepdims=True)).astype(_F32)
                probs = vals * inv
                ctx[start:n_kv, j] = _ggml_mul_mat(v[:n_kv, j].T, probs, "f16")  # V^T rows . probs
            start = n_kv
        attn = _ggml_mul_mat(t(p + "attn.out_proj.weight"), ctx.reshape(seq, n_embd), wtype)

        m = _table(gelu_table, _ggml_mul_mat(t(p + "mlp.fc_in.weight"), h, wtype) + t(p + "mlp.fc_in.bias"))
        mlp = _ggml_mul_mat(t(p + "mlp.fc_out.weight"), m, wtype) + t(p + "mlp.fc_out.bias")
        x = (mlp + attn) + x

    x = _ggml_norm(x, t("transformer.ln_f.weight"), t("transformer.ln_f.bias"))
    return _ggml_mul_mat(t("lm_head.weight"), x, wtype) + t("lm_head.bias")
