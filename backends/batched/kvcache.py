"""The KV cache: per layer one K and one V tensor holding n_slots sequences of n_ctx positions."""

from __future__ import annotations

from dataclasses import dataclass, field


from . import lib
from .lib import ggml

KV_TYPES = {"f16": ggml.GGML_TYPE_F16, "f32": ggml.GGML_TYPE_F32}


@dataclass
class KVCache:
    """K as [head_dim, n_ctx, n_head, n_slots]; V alike, or transposed as [n_ctx, head_dim, n_head, n_slots]."""

    n_slots: int
    n_ctx: int
    n_layer: int
    n_head: int
    head_dim: int
    kv_type: str
    v_transposed: bool = False  # the layout ggml_mul_mat_id attention needs; else flash attention's
    k: list = field(default_factory=list)
    v: list = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens cached per slot
    nbytes: int = 0
    _ctx: int = 0
    _buffer: lib.Buffer | None = None

    @property
    def elem_size(self) -> int:
        """Bytes per cached value."""
        return 2 if self.kv_type == "f16" else 4

    def free(self) -> None:
        """Release the cache memory."""
        if self._buffer is not None:
            ggml.ggml_backend_buffer_free(self._buffer.handle)
            self._buffer = None
        if self._ctx:
            ggml.ggml_free(self._ctx)
            self._ctx = 0


def new_cache(n_slots: int, n_ctx: int, n_layer: int, n_head: int, head_dim: int, kv_type: str = "f16",
              v_transposed: bool = False) -> KVCache:
    """Allocate a zeroed cache (zeros keep never-written positions finite under the mask)."""
    if kv_type not in KV_TYPES:
        raise ValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
    if n_slots < 1 or n_ctx < 1:
        raise ValueError(f"need at least one slot and one position, got n_slots={n_slots}, n_ctx={n_ctx}")
    cache = KVCache(n_slots, n_ctx, n_layer, n_head, head_dim, kv_type, v_transposed, lengths=[0] * n_slots)
    cache._ctx = lib.new_context(2 * n_layer)
    t = KV_TYPES[kv_type]
    for i in range(n_layer):
        k = ggml.ggml_new_tensor_4d(cache._ctx, t, head_dim, n_ctx, n_head, n_slots)
        v_dims = (n_ctx, head_dim) if v_transposed else (head_dim, n_ctx)
        v = ggml.ggml_new_tensor_4d(cache._ctx, t, *v_dims, n_head, n_slots)
        ggml.ggml_set_name(k, f"cache_k.{i}".encode())
        ggml.ggml_set_name(v, f"cache_v.{i}".encode())
        cache.k.append(k)
        cache.v.append(v)
    try:
        cache._buffer = lib.alloc_context(cache._ctx, ggml.ggml_backend_cpu_buffer_type())
    except MemoryError:
        cache.free()
        raise
    ggml.ggml_backend_buffer_clear(cache._buffer.handle, 0)
    cache.nbytes = cache._buffer.nbytes
    return cache
