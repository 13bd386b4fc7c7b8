"""Attention of one step graph over the KV cache, in one of two forms chosen by the cache layout.

* Flash (V stored like K, [head_dim, n_ctx, n_head, n_slots]): ggml's flash attention reads the cache in
  place. The decode tokens (at most one per slot) become one query per slot over every slot's cache (a
  per-slot mask hides other positions and idle slots, whose rows come out zero); each prompt chunk (one
  per slot: a generation's prompt, embedding inputs) attends its own slot's cache in a flash attention of
  its own (the chunks' slots and lengths are part of the graph's shape). Masked positions are skipped and no
  score matrix is built. ggml's CPU kernel accumulates V in f16 when V is f16: ~5e-3 logit error at
  768 positions, far below what quantized weights cost (~5e-2), so quantized models use it.
* Expert (V transposed, [n_ctx, head_dim, n_head, n_slots]): each (slot, head) matrix is an "expert" of
  ggml_mul_mat_id, scores are masked and soft-maxed over the padded length, and every product sums in
  f32. Exact (f32/f16 weights) models keep this one: it stays within the clean GPT-J bound at any length.
  Every token carries its own slot, so any mix of decode tokens and chunks is one graph shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kvcache import KVCache
from .lib import ggml


@dataclass(frozen=True)
class Shape:
    """A graph's shape: decode tokens (one per slot), prompt chunks of distinct slots as (slot, length), attended
    cache length, rows of logits returned, rows of final hidden states returned. A chunk's slot is -1 when the
    graph does not depend on it."""

    n_dec: int
    chunks: tuple[tuple[int, int], ...]
    n_kv: int
    n_out: int
    n_hid: int = 0

    @property
    def n_chunk(self) -> int:
        """Prompt tokens evaluated (every chunk's)."""
        return sum(n for _, n in self.chunks)

    @property
    def n_tokens(self) -> int:
        """Tokens evaluated: the decode tokens first, then the chunks' in order."""
        return self.n_dec + self.n_chunk


def new_input(ctx, inputs: dict, name: str, ggml_type: int, *dims: int):
    """A named graph input tensor of 1 to 4 dimensions, recorded in `inputs`."""
    fn = {1: ggml.ggml_new_tensor_1d, 2: ggml.ggml_new_tensor_2d, 3: ggml.ggml_new_tensor_3d,
          4: ggml.ggml_new_tensor_4d}[len(dims)]
    t = fn(ctx, ggml_type, *dims)
    ggml.ggml_set_name(t, name.encode())
    ggml.ggml_set_input(t)
    inputs[name] = t
    return t


def _mask(visible: np.ndarray, dtype) -> np.ndarray:
    """An additive attention mask: 0 where visible, -inf elsewhere."""
    return np.where(visible, 0.0, -np.inf).astype(dtype)


class FlashAttention:
    """Flash attention over a cache whose V rows are laid out like K's."""

    def __init__(self, ctx, cache: KVCache, shape: Shape, n_embd: int, scale: float, inputs: dict) -> None:
        self.ctx, self.cache, self.shape, self.n_embd, self.scale, self.inputs = ctx, cache, shape, n_embd, scale, inputs
        T = shape.n_tokens
        new_input(ctx, inputs, "k_rows", ggml.GGML_TYPE_I64, cache.n_head * T)
        if shape.n_dec:
            new_input(ctx, inputs, "dec_in", ggml.GGML_TYPE_I32, cache.n_slots)  # slot -> its decode token
            new_input(ctx, inputs, "dec_out", ggml.GGML_TYPE_I32, shape.n_dec)  # decode token -> its slot
            new_input(ctx, inputs, "dec_mask", ggml.GGML_TYPE_F16, shape.n_kv, 1, 1, cache.n_slots)
        for i, (_, n) in enumerate(shape.chunks):
            new_input(ctx, inputs, f"chunk_mask{i}", ggml.GGML_TYPE_F16, shape.n_kv, n)

    def store(self, il: int, k, v):
        """Write the batch's K and V rows at each token's (slot, head, position); the written caches."""
        ctx, c, rows = self.ctx, self.cache, self.inputs["k_rows"]
        n = c.n_ctx * c.n_head * c.n_slots
        k_st = ggml.ggml_set_rows(ctx, ggml.ggml_reshape_2d(ctx, c.k[il], c.head_dim, n),
                                  ggml.ggml_reshape_2d(ctx, k, c.head_dim, c.n_head * self.shape.n_tokens), rows)
        v_st = ggml.ggml_set_rows(ctx, ggml.ggml_reshape_2d(ctx, c.v[il], c.head_dim, n),
                                  ggml.ggml_reshape_2d(ctx, v, c.head_dim, c.n_head * self.shape.n_tokens), rows)
        return k_st, v_st

    def _view(self, t, slots: int, offset: int):
        c, es = self.cache, self.cache.elem_size
        return ggml.ggml_view_4d(self.ctx, t, c.head_dim, self.shape.n_kv, c.n_head, slots, c.head_dim * es,
                                 c.n_ctx * c.head_dim * es, c.n_ctx * c.head_dim * c.n_head * es, offset)

    def _decode(self, q, k_st, v_st):
        ctx, c, sh = self.ctx, self.cache, self.shape
        q_dec = ggml.ggml_view_2d(ctx, q, self.n_embd, sh.n_dec, q.contents.nb[2], 0)
        q_slots = ggml.ggml_get_rows(ctx, q_dec, self.inputs["dec_in"])  # [n_embd, n_slots]
        q_slots = ggml.ggml_permute(ctx, ggml.ggml_reshape_4d(ctx, q_slots, c.head_dim, c.n_head, 1, c.n_slots),
                                    0, 2, 1, 3)
        out = ggml.ggml_flash_attn_ext(ctx, q_slots, self._view(k_st, c.n_slots, 0), self._view(v_st, c.n_slots, 0),
                                       self.inputs["dec_mask"], self.scale, 0.0, 0.0)
        return ggml.ggml_get_rows(ctx, ggml.ggml_reshape_2d(ctx, out, self.n_embd, c.n_slots), self.inputs["dec_out"])

    def _chunk(self, q, k_st, v_st, i: int, slot: int, n: int, first: int):
        """Chunk i (n tokens of one slot, from token `first` of the step) over its own slot's cache."""
        ctx, c = self.ctx, self.cache
        nb = q.contents.nb
        q_chunk = ggml.ggml_view_3d(ctx, q, c.head_dim, c.n_head, n, nb[1], nb[2], first * nb[2])
        q_chunk = ggml.ggml_permute(ctx, q_chunk, 0, 2, 1, 3)  # [head_dim, n, n_head]
        offset = slot * c.n_head * c.n_ctx * c.head_dim * c.elem_size
        out = ggml.ggml_flash_attn_ext(ctx, q_chunk, self._view(k_st, 1, offset), self._view(v_st, 1, offset),
                                       self.inputs[f"chunk_mask{i}"], self.scale, 0.0, 0.0)
        return ggml.ggml_reshape_2d(ctx, out, self.n_embd, n)

    def __call__(self, q, k_st, v_st):
        """[n_embd, n_tokens] output for q [head_dim, n_head, n_tokens], decode tokens first."""
        parts = [self._decode(q, k_st, v_st)] if self.shape.n_dec else []
        first = self.shape.n_dec
        for i, (slot, n) in enumerate(self.shape.chunks):
            parts.append(self._chunk(q, k_st, v_st, i, slot, n, first))
            first += n
        out = parts[0]
        for part in parts[1:]:
            out = ggml.ggml_concat(self.ctx, out, part, 1)
        return out

    @staticmethod
    def fill(g, cache: KVCache, slots: np.ndarray, positions: np.ndarray, n_dec: int) -> None:
        """Set this form's inputs for tokens at (slot, position), the first n_dec of them decode tokens."""
        n_kv = g.shape.n_kv
        heads = np.arange(cache.n_head, dtype=np.int64)
        g.set_input("k_rows", ((slots[:, None] * cache.n_head + heads[None, :]) * cache.n_ctx
                               + positions[:, None]).reshape(-1))
        visible = np.arange(n_kv)[None, :] <= positions[:, None]  # [T, n_kv]
        if n_dec:
            dec = slots[:n_dec]
            dec_in = np.zeros(cache.n_slots, dtype=np.int32)
            dec_in[dec] = np.arange(n_dec, dtype=np.int32)
            dec_mask = np.zeros((cache.n_slots, n_kv), dtype=bool)
            dec_mask[dec] = visible[:n_dec]
            g.set_input("dec_in", dec_in)
            g.set_input("dec_out", dec.astype(np.int32))
            g.set_input("dec_mask", _mask(dec_mask, np.float16))
        first = n_dec
        for i, (_, n) in enumerate(g.shape.chunks):
            g.set_input(f"chunk_mask{i}", _mask(visible[first:first + n], np.float16))
            first += n


class ExpertAttention:
    """Attention through ggml_mul_mat_id over (slot, head) matrices, V cached transposed."""

    def __init__(self, ctx, cache: KVCache, shape: Shape, n_embd: int, scale: float, inputs: dict) -> None:
        self.ctx, self.cache, self.shape, self.n_embd, self.scale, self.inputs = ctx, cache, shape, n_embd, scale, inputs
        T = shape.n_tokens
        new_input(ctx, inputs, "k_rows", ggml.GGML_TYPE_I64, cache.n_head * T)
        new_input(ctx, inputs, "v_rows", ggml.GGML_TYPE_I64, n_embd * T)
        new_input(ctx, inputs, "ids", ggml.GGML_TYPE_I32, cache.n_head, T)
        new_input(ctx, inputs, "mask", ggml.GGML_TYPE_F32, shape.n_kv, 1, T)

    def store(self, il: int, k, v):
        """Write the batch's K rows and V columns at each token's (slot, position); the written caches."""
        ctx, c, T = self.ctx, self.cache, self.shape.n_tokens
        k_all = ggml.ggml_reshape_2d(ctx, c.k[il], c.head_dim, c.n_ctx * c.n_head * c.n_slots)
        k_st = ggml.ggml_set_rows(ctx, k_all, ggml.ggml_reshape_2d(ctx, k, c.head_dim, c.n_head * T),
                                  self.inputs["k_rows"])
        v_all = ggml.ggml_reshape_2d(ctx, c.v[il], 1, c.n_ctx * self.n_embd * c.n_slots)
        v_st = ggml.ggml_set_rows(ctx, v_all, ggml.ggml_reshape_2d(ctx, v, 1, self.n_embd * T), self.inputs["v_rows"])
        return k_st, v_st

    def __call__(self, q, k_st, v_st):
        """[n_embd, n_tokens] output: per token, its own slot's (head) matrices picked by mul_mat_id."""
        ctx, c, n_kv, es = self.ctx, self.cache, self.shape.n_kv, self.cache.elem_size
        n_exp = c.n_head * c.n_slots
        k_view = ggml.ggml_view_3d(ctx, k_st, c.head_dim, n_kv, n_exp, c.head_dim * es, c.n_ctx * c.head_dim * es, 0)
        kq = ggml.ggml_mul_mat_id(ctx, k_view, q, self.inputs["ids"])  # [n_kv, n_head, T]
        kq = ggml.ggml_soft_max_ext(ctx, ggml.ggml_add(ctx, kq, self.inputs["mask"]), None, self.scale, 0.0)
        v_view = ggml.ggml_view_3d(ctx, v_st, n_kv, c.head_dim, n_exp, c.n_ctx * es, c.n_ctx * c.head_dim * es, 0)
        kqv = ggml.ggml_mul_mat_id(ctx, v_view, kq, self.inputs["ids"])  # [head_dim, n_head, T]
        return ggml.ggml_reshape_2d(ctx, kqv, self.n_embd, self.shape.n_tokens)

    @staticmethod
    def fill(g, cache: KVCache, slots: np.ndarray, positions: np.ndarray, n_dec: int) -> None:
        """Set this form's inputs for tokens at (slot, position)."""
        heads = np.arange(cache.n_head, dtype=np.int64)
        expert = slots[:, None] * cache.n_head + heads[None, :]  # [T, n_head]
        n_embd = cache.n_head * cache.head_dim
        dims = np.arange(n_embd, dtype=np.int64)
        g.set_input("k_rows", (expert * cache.n_ctx + positions[:, None]).reshape(-1))
        g.set_input("v_rows", ((slots[:, None] * n_embd + dims[None, :]) * cache.n_ctx
                               + positions[:, None]).reshape(-1))
        g.set_input("ids", expert.astype(np.int32))
        g.set_input("mask", _mask(np.arange(g.shape.n_kv)[None, :] <= positions[:, None], np.float32))


def form(cache: KVCache) -> type[FlashAttention | ExpertAttention]:
    """The attention form a cache's layout calls for."""
    return ExpertAttention if cache.v_transposed else FlashAttention
