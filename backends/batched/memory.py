"""What a batched engine process needs in memory: one formula for the engine's own check and the registry's.

Pure arithmetic (no ggml import), so the server process can estimate an `engine: ggml` entry before
starting anything.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
DEFAULT_KV_TYPE = "f16"
KV_ELEM_BYTES = {"f16": 2, "f32": 4}
PREFILL_CHUNK = 32  # prompt tokens per graph evaluation
MAX_GRAPHS = 16  # step graphs kept built (LRU), each with its own compute buffer


def engine_context(file_n_ctx: int, n_ctx: int | None) -> int:
    """Positions per slot the engine caches: the asked context (the served context_length), at most the file's."""
    return file_n_ctx if n_ctx is None else min(int(n_ctx), file_n_ctx)


def kv_cache_bytes(n_slots: int, n_ctx: int, n_layer: int, n_embd: int, kv_type: str = DEFAULT_KV_TYPE) -> int:
    """K and V of every layer for n_slots sequences of n_ctx positions."""
    return 2 * n_layer * n_slots * n_ctx * n_embd * KV_ELEM_BYTES[kv_type]


def graph_bytes(n_tokens: int, n_kv: int, n_out: int, n_embd: int, n_head: int, n_vocab: int) -> int:
    """Upper bound of one step graph's compute buffer: attention scores + MLP activations + logits (f32)."""
    return 4 * (n_kv * n_head * n_tokens + 4 * n_embd * n_tokens + n_out * n_vocab)


def kv_text(n_slots: int, n_ctx: int, kv_type: str, nbytes: int) -> str:
    """A KV cache as '8 slots x 2048 positions x f16 = 256.0 MiB'."""
    return f"{n_slots} slots x {n_ctx} positions x {kv_type} = {nbytes / MiB:,.1f} MiB"


@dataclass(frozen=True)
class EngineMemory:
    """Bytes one batched engine process needs, by part."""

    weights: int
    kv_cache: int
    compute: int
    n_slots: int
    n_ctx: int
    kv_type: str

    @property
    def total(self) -> int:
        """Weights + KV cache + compute buffers."""
        return self.weights + self.kv_cache + self.compute

    def kv_text(self) -> str:
        """The KV cache as '8 slots x 2048 positions x f16 = 256.0 MiB'."""
        return kv_text(self.n_slots, self.n_ctx, self.kv_type, self.kv_cache)


def engine_memory(weights: int, n_layer: int, n_embd: int, n_head: int, n_vocab: int, file_n_ctx: int,
                  n_slots: int, n_ctx: int | None = None, kv_type: str = DEFAULT_KV_TYPE,
                  chunk: int = PREFILL_CHUNK, graphs: int = MAX_GRAPHS) -> EngineMemory:
    """The engine's memory for a model's shape and a configuration (n_ctx None = the file's context)."""
    if kv_type not in KV_ELEM_BYTES:
        raise ValueError(f"kv_type must be one of {sorted(KV_ELEM_BYTES)}, got {kv_type!r}")
    ctx = engine_context(file_n_ctx, n_ctx)
    biggest = graph_bytes(n_slots + chunk, ctx, n_slots + 1, n_embd, n_head, n_vocab)
    return EngineMemory(weights, kv_cache_bytes(n_slots, ctx, n_layer, n_embd, kv_type),
                        max(1, graphs) * biggest, n_slots, ctx, kv_type)
