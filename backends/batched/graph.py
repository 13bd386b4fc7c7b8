"""One forward graph of GPT-J over a batch of (slot, position, token), built once per shape."""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import numpy as np

from . import lib
from .lib import ggml
from .attention import Shape, form, new_input
from .kvcache import KVCache
from .weights import Weights

LN_EPS = 1e-5
ROPE_BASE = 10000.0
_NODES_PER_LAYER = 64


@dataclass
class StepGraph:
    """A built, allocated graph and its input/output tensors."""

    shape: Shape
    ctx: int
    graph: object
    galloc: int
    inputs: dict
    logits: object  # [n_vocab, n_out] (None when n_out is 0)
    compute_bytes: int
    hidden: object = None  # [n_embd, n_hid]: final hidden states (after ln_f) of the rows asked for

    def read_hidden(self, n_embd: int) -> np.ndarray:
        """A copy of the final hidden states, shape [n_hid, n_embd] (float32)."""
        ptr = ctypes.cast(self.hidden.contents.data, ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(ptr, shape=(self.shape.n_hid, n_embd)).copy()

    def set_input(self, name: str, array: np.ndarray) -> None:
        """Copy a numpy array (exactly the tensor's size) into an input tensor."""
        t = self.inputs[name]
        nbytes = ggml.ggml_nbytes(t)
        if array.nbytes != nbytes:
            raise ValueError(f"input {name}: {array.nbytes} bytes for a {nbytes}-byte tensor")
        ctypes.memmove(t.contents.data, np.ascontiguousarray(array).ctypes.data, nbytes)

    def read_logits(self, n_vocab: int) -> np.ndarray:
        """A copy of the logits, shape [n_out, n_vocab]."""
        ptr = ctypes.cast(self.logits.contents.data, ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(ptr, shape=(self.shape.n_out, n_vocab)).copy()

    def free(self) -> None:
        """Release the graph's compute buffer and metadata."""
        if self.galloc:
            ggml.ggml_gallocr_free(self.galloc)
            self.galloc = 0
        if self.ctx:
            ggml.ggml_free(self.ctx)
            self.ctx = 0


def _norm(ctx, x, w, b):
    return ggml.ggml_add(ctx, ggml.ggml_mul(ctx, ggml.ggml_norm(ctx, x, LN_EPS), w), b)


def build(weights: Weights, cache: KVCache, shape: Shape) -> StepGraph:
    """Build and allocate the graph for `shape` (inputs are filled per step by the engine)."""
    info = weights.info
    n_embd, n_head, n_rot = info.n_embd, info.n_head, info.n_rot
    head_dim, T = cache.head_dim, shape.n_tokens
    n_nodes = (_NODES_PER_LAYER + 8 * len(shape.chunks)) * (info.n_layer + 1)
    ctx = lib.new_context(n_nodes)
    gf = ggml.ggml_new_graph_custom(ctx, n_nodes, False)
    inputs: dict = {}
    tokens = new_input(ctx, inputs, "tokens", ggml.GGML_TYPE_I32, T)
    pos = new_input(ctx, inputs, "pos", ggml.GGML_TYPE_I32, T)
    out_rows = new_input(ctx, inputs, "out_rows", ggml.GGML_TYPE_I32, shape.n_out + shape.n_hid)
    attention = form(cache)(ctx, cache, shape, n_embd, 1.0 / math.sqrt(head_dim), inputs)

    x = ggml.ggml_get_rows(ctx, weights.wte, tokens)  # [n_embd, T]
    for il, L in enumerate(weights.layers):
        h = _norm(ctx, x, L.ln_w, L.ln_b)
        q = ggml.ggml_reshape_3d(ctx, ggml.ggml_mul_mat(ctx, L.wq, h), head_dim, n_head, T)
        k = ggml.ggml_reshape_3d(ctx, ggml.ggml_mul_mat(ctx, L.wk, h), head_dim, n_head, T)
        v = ggml.ggml_mul_mat(ctx, L.wv, h)  # [n_embd, T]
        q = ggml.ggml_rope_ext(ctx, q, pos, None, n_rot, 0, 0, ROPE_BASE, 1.0, 0.0, 1.0, 0.0, 0.0)
        k = ggml.ggml_rope_ext(ctx, k, pos, None, n_rot, 0, 0, ROPE_BASE, 1.0, 0.0, 1.0, 0.0, 0.0)
        k_st, v_st = attention.store(il, k, v)
        attn = ggml.ggml_mul_mat(ctx, L.wo, attention(q, k_st, v_st))
        ff = ggml.ggml_add(ctx, ggml.ggml_mul_mat(ctx, L.fc_in_w, h), L.fc_in_b)
        ff = ggml.ggml_add(ctx, ggml.ggml_mul_mat(ctx, L.fc_out_w, ggml.ggml_gelu(ctx, ff)), L.fc_out_b)
        x = ggml.ggml_add(ctx, ggml.ggml_add(ctx, x, attn), ff)
    x = ggml.ggml_get_rows(ctx, x, out_rows)  # only the rows whose logits or hidden states are wanted
    x = _norm(ctx, x, weights.ln_f_w, weights.ln_f_b)  # GPT-J's final hidden states
    logits = hidden = None
    if shape.n_out:
        rows = x if not shape.n_hid else ggml.ggml_view_2d(ctx, x, n_embd, shape.n_out, x.contents.nb[1], 0)
        logits = ggml.ggml_add(ctx, ggml.ggml_mul_mat(ctx, weights.lm_head_w, rows), weights.lm_head_b)
        _output(gf, logits, b"logits")
    if shape.n_hid:
        hidden = x if not shape.n_out else ggml.ggml_cont(ctx, ggml.ggml_view_2d(
            ctx, x, n_embd, shape.n_hid, x.contents.nb[1], shape.n_out * x.contents.nb[1]))  # a node of its own
        _output(gf, hidden, b"hidden")
    galloc = ggml.ggml_gallocr_new(ggml.ggml_backend_cpu_buffer_type())
    if not galloc or not ggml.ggml_gallocr_alloc_graph(galloc, gf):
        if galloc:
            ggml.ggml_gallocr_free(galloc)
        ggml.ggml_free(ctx)
        raise MemoryError(f"could not allocate the compute buffer for {shape}")
    return StepGraph(shape, ctx, gf, galloc, inputs, logits, ggml.ggml_gallocr_get_buffer_size(galloc, 0), hidden)


def _output(gf, t, name: bytes) -> None:
    """Mark a tensor as a graph output (kept readable after compute)."""
    ggml.ggml_set_name(t, name)
    ggml.ggml_set_output(t)
    ggml.ggml_build_forward_expand(gf, t)


def fill_inputs(g: StepGraph, cache: KVCache, slots: list[int], positions: list[int], tokens: list[int],
                out: list[int]) -> None:
    """Set a graph's inputs for tokens at (slot, position) (decode tokens first) and the logit rows wanted."""
    s = np.asarray(slots, dtype=np.int64)
    p = np.asarray(positions, dtype=np.int64)
    g.set_input("tokens", np.asarray(tokens, dtype=np.int32))
    g.set_input("pos", p.astype(np.int32))
    g.set_input("out_rows", np.asarray(out, dtype=np.int32))
    form(cache).fill(g, cache, s, p, g.shape.n_dec)
