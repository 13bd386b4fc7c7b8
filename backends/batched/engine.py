"""BatchedEngine: one copy of GPT-J weights decoding many sequences (slots) in one ggml graph per step."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from . import graph as graphs
from . import lib
from .lib import ggml
from .kvcache import new_cache
from .memory import (DEFAULT_KV_TYPE, MAX_GRAPHS, PREFILL_CHUNK, EngineMemory, engine_context, engine_memory,
                     kv_text)
from .weights import load_weights

log = logging.getLogger(__name__)

KV_PAD = 32  # attended cache length is rounded up to this, so graphs are reused across steps


@dataclass
class EngineConfig:
    """How to load and run a model."""

    n_slots: int = 8
    n_ctx: int | None = None  # cached positions per slot; None = the model's context
    threads: int = 2
    kv_type: str = DEFAULT_KV_TYPE
    repack: bool = True
    max_graphs: int = MAX_GRAPHS  # graphs kept built (LRU)
    check_memory: bool = True  # refuse to load when weights + KV cache exceed MemAvailable


class BatchedEngine:
    """A GPT-J model with a KV cache of n_slots sequences; not thread-safe."""

    def __init__(self, path: str, config: EngineConfig | None = None) -> None:
        self.config = cfg = config or EngineConfig()
        started = time.perf_counter()
        if cfg.check_memory:
            check_fits(path, cfg)
        self.weights = load_weights(path, repack=cfg.repack)
        info = self.weights.info
        self.n_vocab, self.n_embd, self.n_head = info.n_vocab, info.n_embd, info.n_head
        self.eos_token_id = info.eos_token_id
        n_ctx = engine_context(info.n_ctx, cfg.n_ctx)
        kv_started = time.perf_counter()
        try:
            self.cache = new_cache(cfg.n_slots, n_ctx, info.n_layer, info.n_head, info.n_embd // info.n_head,
                                   cfg.kv_type, v_transposed=exact_weights(self.weights))
        except BaseException:
            self.weights.free()
            raise
        self.backend = lib.cpu_backend(cfg.threads)
        self._graphs: OrderedDict[graphs.Shape, graphs.StepGraph] = OrderedDict()
        now = time.perf_counter()
        self.report = load_report(self, now - kv_started, now - started)
        log.info("%s", self.report)

    @property
    def n_slots(self) -> int:
        """Sequences the cache holds."""
        return self.cache.n_slots

    @property
    def n_ctx(self) -> int:
        """Positions per slot."""
        return self.cache.n_ctx

    def length(self, slot: int) -> int:
        """Tokens cached in a slot."""
        return self.cache.lengths[self._check_slot(slot)]

    def reset(self, slot: int, keep: int = 0) -> None:
        """Forget a slot's cache past its first `keep` tokens (0: free the slot for a new sequence)."""
        self._check_slot(slot)
        if not 0 <= keep <= self.cache.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.cache.lengths[slot]} tokens, cannot keep {keep}")
        self.cache.lengths[slot] = keep

    def prefill(self, slot: int, tokens: list[int], start: int = 0, chunk: int = PREFILL_CHUNK) -> np.ndarray:
        """Evaluate tokens from position `start` of a slot in chunks; the last token's logits."""
        if not tokens:
            raise ValueError("prefill needs at least one token")
        self._check_tokens(tokens)
        if start + len(tokens) > self.cache.n_ctx:
            raise OverflowError(f"slot {slot}: {start} + {len(tokens)} tokens exceed the context of {self.n_ctx}")
        self.reset(slot, start)
        out = None
        for i in range(0, len(tokens), max(1, chunk)):
            out = self.step([], (slot, tokens[i:i + chunk]))[1]
        return out

    def decode(self, batch: list[tuple[int, int]]) -> np.ndarray:
        """Append one token to each listed slot (each at its own position); logits [len(batch), n_vocab]."""
        if not batch:
            raise ValueError("decode needs at least one (slot, token)")
        return self.step(batch)[0]

    def step(self, decodes: list[tuple[int, int]], chunk: tuple[int, list[int]] | None = None
             ) -> tuple[np.ndarray, np.ndarray | None]:
        """One graph: decode tokens plus an optional prompt chunk; (decode logits, chunk's last logits)."""
        logits, last, _ = self.step_pooled(decodes, chunk)
        return logits, last

    def step_pooled(self, decodes: list[tuple[int, int]], chunk: tuple[int, list[int]] | None = None,
                    pooled: list[tuple[int, list[int]]] | tuple = ()
                    ) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray]]:
        """One graph: decode tokens, an optional prompt chunk (its last logits) and chunks of other slots whose
        final hidden states (after ln_f) are summed, one float64 vector per pooled chunk (embeddings).
        Returns (decode logits, chunk's last logits, pooled sums)."""
        slots = [self._check_slot(s) for s, _ in decodes]
        tokens = [int(t) for _, t in decodes]
        wants = [(s, 1) for s in slots]
        for cslot, ctoks in ([chunk] if chunk is not None else []) + list(pooled):
            cslot, ctoks = self._check_slot(cslot), [int(t) for t in ctoks]
            if not ctoks:
                raise ValueError("a prompt chunk needs at least one token")
            slots += [cslot] * len(ctoks)
            tokens += ctoks
            wants.append((cslot, len(ctoks)))
        if not tokens:
            raise ValueError("nothing to evaluate")
        self._check_tokens(tokens)
        if len({s for s, _ in wants}) != len(wants):
            raise ValueError(f"a slot appears twice in one step: {[s for s, _ in wants]}")
        self._check_room(wants)
        positions, seen = [], {}
        for s in slots:
            seen[s] = seen.get(s, -1) + 1
            positions.append(self.cache.lengths[s] + seen[s])
        n_dec = len(decodes)
        first_pooled = n_dec + (len(chunk[1]) if chunk is not None else 0)
        out_rows = list(range(n_dec)) + ([first_pooled - 1] if chunk is not None else [])
        logits, hidden = self._forward(slots, positions, tokens, out_rows, n_dec, wants[n_dec:],
                                       list(range(first_pooled, len(tokens))))
        for s, n in wants:
            self.cache.lengths[s] += n
        sums, at = [], 0
        for _, ctoks in pooled:
            sums.append(hidden[at:at + len(ctoks)].sum(axis=0, dtype=np.float64))
            at += len(ctoks)
        return logits[:n_dec], (logits[n_dec] if chunk is not None else None), sums

    def close(self) -> None:
        """Free graphs, cache, weights and backend."""
        for g in self._graphs.values():
            g.free()
        self._graphs.clear()
        if getattr(self, "backend", None):
            ggml.ggml_backend_free(self.backend)
            self.backend = None
        if getattr(self, "cache", None) is not None:
            self.cache.free()
        if getattr(self, "weights", None) is not None:
            self.weights.free()

    def __enter__(self) -> BatchedEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # internals

    def _check_slot(self, slot: int) -> int:
        if not 0 <= slot < self.cache.n_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.cache.n_slots})")
        return slot

    def _check_tokens(self, tokens: list[int]) -> None:
        bad = [t for t in tokens if not 0 <= int(t) < self.n_vocab]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.n_vocab}): {bad[:5]}")

    def _check_room(self, wants: list[tuple[int, int]]) -> None:
        for slot, n in wants:
            if self.cache.lengths[slot] + n > self.cache.n_ctx:
                raise OverflowError(f"slot {slot}: {self.cache.lengths[slot]} + {n} tokens exceed the "
                                    f"context of {self.cache.n_ctx}")

    def _graph(self, shape: graphs.Shape) -> graphs.StepGraph:
        g = self._graphs.get(shape)
        if g is not None:
            self._graphs.move_to_end(shape)
            return g
        g = graphs.build(self.weights, self.cache, shape)
        self._graphs[shape] = g
        while len(self._graphs) > max(1, self.config.max_graphs):
            self._graphs.popitem(last=False)[1].free()
        return g

    def _forward(self, slots: list[int], positions: list[int], tokens: list[int], out: list[int], n_dec: int,
                 chunks: list[tuple[int, int]], hid: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """Run one graph over tokens at (slot, position): the first n_dec of them decode tokens of distinct
        slots, then the chunks (slot, length) in order; return the logits of the `out` rows ([0, n_vocab]
        when none) and the final hidden states of the `hid` rows (None when none)."""
        c = self.cache
        n_kv = min(c.n_ctx, -(-(max(positions) + 1) // KV_PAD) * KV_PAD)
        if c.v_transposed:  # the expert form reads every token's own slot: its graph depends on neither
            spans = ((-1, sum(n for _, n in chunks)),) if chunks else ()
        else:  # flash views each chunk's slot
            spans = tuple(chunks)
        g = self._graph(graphs.Shape(n_dec, spans, n_kv, len(out), len(hid)))
        graphs.fill_inputs(g, c, slots, positions, tokens, out + hid)
        status = ggml.ggml_backend_graph_compute(self.backend, g.graph)
        if status != 0:
            raise RuntimeError(f"ggml graph compute failed (status {status})")
        logits = g.read_logits(self.n_vocab) if out else np.zeros((0, self.n_vocab), dtype=np.float32)
        return logits, (g.read_hidden(self.n_embd) if hid else None)


def exact_weights(weights) -> bool:
    """Whether the matmul weights are f32/f16: such models keep the attention that sums V in f32."""
    return weights.layers[0].wq.contents.type in (ggml.GGML_TYPE_F32, ggml.GGML_TYPE_F16)


def load_report(engine: BatchedEngine, kv_seconds: float, total_seconds: float) -> str:
    """What loading cost: the weights (repack timed), the KV cache as slots x positions x type = MiB, times."""
    c = engine.cache
    return (f"{engine.weights.report.describe()}; KV cache {kv_text(c.n_slots, c.n_ctx, c.kv_type, c.nbytes)} "
            f"allocated and zeroed in {kv_seconds:.2f} s; engine loaded in {total_seconds:.2f} s")


def estimate(path: str, config: EngineConfig) -> EngineMemory:
    """The memory a configuration needs, from the file's headers (before loading anything)."""
    from backends.ggml.reader import scan_model

    info, records, _ = scan_model(path)
    return engine_memory(sum(t.nbytes for t in records), info.n_layer, info.n_embd, info.n_head, info.n_vocab,
                         info.n_ctx, config.n_slots, config.n_ctx, config.kv_type, graphs=config.max_graphs)


def memory_needed(path: str, config: EngineConfig) -> dict[str, int]:
    """Weights, KV cache and compute-buffer bytes a configuration needs (before loading)."""
    need = estimate(path, config)
    return {"weights": need.weights, "kv_cache": need.kv_cache, "compute": need.compute}


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where unknown)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(path: str, config: EngineConfig, headroom: float = 0.1) -> dict[str, int]:
    """Raise MemoryError, saying what to lower, if weights + KV cache + compute (+ headroom) exceed free RAM."""
    need = estimate(path, config)
    avail = available_memory()
    total = int(need.total * (1 + headroom))
    if avail is not None and total > avail:
        mib = 2**20
        raise MemoryError(
            f"{path}: needs ~{total / mib:,.0f} MiB (weights {need.weights / mib:,.0f} MiB + KV cache "
            f"{need.kv_text()} + compute {need.compute / mib:,.0f} MiB, +{headroom:.0%}) but only "
            f"{avail / mib:,.0f} MiB is available: lower the number of slots (`parallel`) or the context per "
            f"slot (`context_length`)")
    return {"weights": need.weights, "kv_cache": need.kv_cache, "compute": need.compute}
