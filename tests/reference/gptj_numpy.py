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

``ggml_f16=True`` rounds to float16 where ctransformers 0.2.27's ggml does even for f32 weights:
the KV cache is f16 (K after rotary, V), Q is converted to f16 for the K.Q product, softmax takes
``exp`` from an f16 table (argument and result rounded to f16), the probabilities are converted to
f16 for the product with V, and GELU is an f16 table (argument and result rounded to f16). With
f16 weights (``weight_type="f16"``, or ``hparams["ftype"] == 1``) it also rounds the input of
every weight matmul to f16 (q/k/v, out_proj, fc_in, fc_out, lm_head): ggml's
``ggml_compute_forward_mul_mat`` converts the f32 rows of src1 to src0's ``vec_dot_type``, which
for an f16 src0 is f16 (``ggml_fp32_to_fp16_row``), then ``ggml_vec_dot_f16`` multiplies the two
f16 rows with f32 accumulation. Quantized weights quantize those activations to q8_0/q8_1
instead; that is not emulated (``ggml_f16=True`` with a quantized weight type is an error). The
default (``ggml_f16=False``) is the clean float64 model, whatever the weight type; the option
exists to show that the remaining difference to the engine is this rounding and nothing else.
"""

from __future__ import annotations

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
) -> np.ndarray:
    """Logits for every position: array [len(tokens), n_vocab].

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
    return _linear(a16(x), t("lm_head.weight"), t("lm_head.bias"))
