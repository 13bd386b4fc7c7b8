"""One forward graph of GPT-J over a batch of (slot, position, token), built once per shape."""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import numpy as np

from . import lib
from .lib import ggml
from .kvcache import KVCache
from .weights import Weights

LN_EPS = 1e-5
ROPE_BASE = 10000.0
_NODES_PER_LAYER = 64


@dataclass(frozen=True)
class Shape:
    """A graph's shape: tokens in the batch, attended cache length, rows of logits returned."""

    n_tokens: int
    n_kv: int
    n_out: int


@dataclass
class StepGraph:
    """A built, allocated graph and its input/output tensors."""

    shape: Shape
    ctx: int
    graph: object
    galloc: int
    inputs: dict
    logits: object
    compute_bytes: int

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


def _input(ctx, inputs: dict, name: str, ggml_type: int, *dims: int):
    fn = {1: ggml.ggml_new_tensor_1d, 2: ggml.ggml_new_tensor_2d, 3: ggml.ggml_new_tensor_3d}[len(dims)]
    t = fn(ctx, ggml_type, *dims)
    ggml.ggml_set_name(t, name.encode())
    ggml.ggml_set_input(t)
    inputs[name] = t
    return t


def _norm(ctx, x, w, b):
    return ggml.ggml_add(ctx, ggml.ggml_mul(ctx, ggml.ggml_norm(ctx, x, LN_EPS), w), b)


def build(weights: Weights, cache: KVCache, shape: Shape) -> StepGraph:
    """Build and allocate the graph for `shape` (inputs are filled per step by the engine)."""
    info = weights.info
    n_embd, n_head, n_rot = info.n_embd, info.n_head, info.n_rot
    head_dim, T, n_kv = cache.head_dim, shape.n_tokens, shape.n_kv
    n_exp = n_head * cache.n_slots  # one (slot, head) matrix per "expert" of mul_mat_id
    es = cache.elem_size
    n_nodes = _NODES_PER_LAYER * (info.n_layer + 1)
    ctx = lib.new_context(n_nodes)
    gf = ggml.ggml_new_graph_custom(ctx, n_nodes, False)
    inputs: dict = {}
    tokens = _input(ctx, inputs, "tokens", ggml.GGML_TYPE_I32, T)
    pos = _input(ctx, inputs, "pos", ggml.GGML_TYPE_I32, T)
    k_rows = _input(ctx, inputs, "k_rows", ggml.GGML_TYPE_I64, n_head * T)
    v_rows = _input(ctx, inputs, "v_rows", ggml.GGML_TYPE_I64, n_embd * T)
    ids = _input(ctx, inputs, "ids", ggml.GGML_TYPE_I32, n_head, T)
    mask = _input(ctx, inputs, "mask", ggml.GGML_TYPE_F32, n_kv, 1, T)
    out_rows = _input(ctx, inputs, "out_rows", ggml.GGML_TYPE_I32, shape.n_out)
    scale = 1.0 / math.sqrt(head_dim)

    x = ggml.ggml_get_rows(ctx, weights.wte, tokens)  # [n_embd, T]
    for il, L in enumerate(weights.layers):
        h = _norm(ctx, x, L.ln_w, L.ln_b)
        q = ggml.ggml_reshape_3d(ctx, ggml.ggml_mul_mat(ctx, L.wq, h), head_dim, n_head, T)
        k = ggml.ggml_reshape_3d(ctx, ggml.ggml_mul_mat(ctx, L.wk, h), head_dim, n_head, T)
        v = ggml.ggml_mul_mat(ctx, L.wv, h)  # [n_embd, T]
        q = ggml.ggml_rope_ext(ctx, q, pos, None, n_rot, 0, 0, ROPE_BASE, 1.0, 0.0, 1.0, 0.0, 0.0)
        k = ggml.ggml_rope_ext(ctx, k, pos, None, n_rot, 0, 0, ROPE_BASE, 1.0, 0.0, 1.0, 0.0, 0.0)
        # store this batch's K rows and V columns at each token's (slot, position)
        k_all = ggml.ggml_reshape_2d(ctx, cache.k[il], head_dim, cache.n_ctx * n_exp)
        k_st = ggml.ggml_set_rows(ctx, k_all, ggml.ggml_reshape_2d(ctx, k, head_dim, n_head * T), k_rows)
        v_all = ggml.ggml_reshape_2d(ctx, cache.v[il], 1, cache.n_ctx * n_embd * cache.n_slots)
        v_st = ggml.ggml_set_rows(ctx, v_all, ggml.ggml_reshape_2d(ctx, v, 1, n_embd * T), v_rows)
        # attention per token over its own slot: mul_mat_id picks the (slot, head) matrices
        k_view = ggml.ggml_view_3d(ctx, k_st, head_dim, n_kv, n_exp, head_dim * es, cache.n_ctx * head_dim * es, 0)
        kq = ggml.ggml_mul_mat_id(ctx, k_view, q, ids)  # [n_kv, n_head, T]
        kq = ggml.ggml_soft_max_ext(ctx, ggml.ggml_add(ctx, kq, mask), None, scale, 0.0)
        v_view = ggml.ggml_view_3d(ctx, v_st, n_kv, head_dim, n_exp, cache.n_ctx * es, cache.n_ctx * head_dim * es, 0)
        kqv = ggml.ggml_mul_mat_id(ctx, v_view, kq, ids)  # [head_dim, n_head, T]
        attn = ggml.ggml_mul_mat(ctx, L.wo, ggml.ggml_reshape_2d(ctx, kqv, n_embd, T))
        ff = ggml.ggml_add(ctx, ggml.ggml_mul_mat(ctx, L.fc_in_w, h), L.fc_in_b)
        ff = ggml.ggml_add(ctx, ggml.ggml_mul_mat(ctx, L.fc_out_w, ggml.ggml_gelu(ctx, ff)), L.fc_out_b)
        x = ggml.ggml_add(ctx, ggml.ggml_add(ctx, x, attn), ff)
    x = ggml.ggml_get_rows(ctx, x, out_rows)  # only the rows whose logits are wanted
    x = _norm(ctx, x, weights.ln_f_w, weights.ln_f_b)
    logits = ggml.ggml_add(ctx, ggml.ggml_mul_mat(ctx, weights.lm_head_w, x), weights.lm_head_b)
    ggml.ggml_set_name(logits, b"logits")
    ggml.ggml_set_output(logits)
    ggml.ggml_build_forward_expand(gf, logits)
    galloc = ggml.ggml_gallocr_new(ggml.ggml_backend_cpu_buffer_type())
    if not galloc or not ggml.ggml_gallocr_alloc_graph(galloc, gf):
        if galloc:
            ggml.ggml_gallocr_free(galloc)
        ggml.ggml_free(ctx)
        raise MemoryError(f"could not allocate the compute buffer for {shape}")
    return StepGraph(shape, ctx, gf, galloc, inputs, logits, ggml.ggml_gallocr_get_buffer_size(galloc, 0))
