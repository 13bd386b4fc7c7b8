"""The global worker cap: refuse a registry whose workers, or their estimated memory, cannot fit."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from backends.batched.memory import EngineMemory, engine_memory
from backends.registry_load import RegistryError

if TYPE_CHECKING:
    from backends.ggml.reader import ModelInfo
    from backends.registry import ServedModel

log = logging.getLogger(__name__)
MiB = 1 << 20
# RSS of a worker beyond its weights and KV cache: Python, ctransformers and ggml's buffers. Measured on a
# demo-model worker (0.3 MiB file, 2 MiB KV cache): 51 MiB loaded and idle, 55 MiB peak after a full
# generation; rounded up for the engine's scratch buffers, which grow a little with the model.
WORKER_OVERHEAD = 64 * MiB
_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a number near 2**63
_SHOWN = 5  # models itemised in the refusal message


def kv_cache_bytes(info: ModelInfo) -> int:
    """ctransformers' GPT-J key and value caches: 2 x n_layer x n_ctx x n_embd f16 values, allocated at load.

    ctransformers sizes them from the file's n_ctx whatever the entry's context_length (it ignores
    `context_length=` for GPT-J), so the file's n_ctx is the right figure here.
    """
    return 2 * info.n_layer * info.n_ctx * info.n_embd * 2


def worker_bytes(info: ModelInfo) -> int:
    """Estimated memory of one ctransformers worker: the weights (file size) + KV cache + process overhead."""
    return info.file_size + kv_cache_bytes(info) + WORKER_OVERHEAD


def batched_memory(model: ServedModel) -> EngineMemory:
    """What one `engine: ggml` process of an entry needs, by the engine's own formula: the weights (the file,
    whose vocabulary the process holds too), `parallel` KV caches of the served context, compute buffers."""
    info = model.info
    return engine_memory(info.file_size, info.n_layer, info.n_embd, info.n_head, info.n_vocab, info.n_ctx,
                         model.spec.slots, model.context_length)


def process_bytes(model: ServedModel) -> int:
    """Estimated memory of one process of an entry (either engine)."""
    if model.spec.engine == "ggml":
        return batched_memory(model).total + WORKER_OVERHEAD
    return worker_bytes(model.info)


def _itemise(model: ServedModel) -> str:
    """One entry's share of the estimate, part by part."""
    head = f"{model.spec.id} {model.spec.workers} x {_size(process_bytes(model))}"
    if model.spec.engine == "ggml":
        need = batched_memory(model)
        return (f"{head} (file {_size(need.weights)} + KV cache {need.kv_text()} + compute "
                f"{_size(need.compute)} + process {_size(WORKER_OVERHEAD)})")
    return (f"{head} (file {_size(model.info.file_size)} + KV cache {_size(kv_cache_bytes(model.info))} + "
            f"process {_size(WORKER_OVERHEAD)})")


def _cgroup_limits() -> list[int]:
    """Memory limits of this process's cgroup (v2 memory.max, v1 memory.limit_in_bytes), in bytes."""
    files = [Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            if controllers == "":
                files.append(Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.max")
            elif "memory" in controllers.split(","):
                files.append(Path("/sys/fs/cgroup/memory") / rel.lstrip("/") / "memory.limit_in_bytes")
    except (OSError, ValueError):
        pass
    limits = []
    for file in files:
        try:
            value = file.read_text().strip()
        except OSError:
            continue
        if value.isdigit() and 0 < int(value) < _UNLIMITED:
            limits.append(int(value))
    return limits


def _mem_total() -> int | None:
    """MemTotal from /proc/meminfo (else the physical pages), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def machine_memory() -> tuple[int | None, str]:
    """(bytes, where the figure comes from): MemTotal, or the cgroup limit when that is lower."""
    total = _mem_total()
    limits = _cgroup_limits()
    if limits and (total is None or min(limits) < total):
        return min(limits), "the cgroup memory limit"
    return total, "the machine's MemTotal"


def _size(n: float) -> str:
    """Bytes as GiB (one decimal), MiB or KiB."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


def _budget(memory_budget_mb: int | None) -> tuple[int | None, str]:
    """(bytes, source) of the memory budget; None when unchecked or unknown."""
    if memory_budget_mb is None:
        return None, ""
    if memory_budget_mb:
        return memory_budget_mb * MiB, "--memory-budget-mb"
    return machine_memory()


def fit_default_slots(served: list[ServedModel], memory_budget_mb: int | None) -> list[ServedModel]:
    """Lower the slots of engine: ggml entries that do not set `parallel` (default 8) until the served models
    fit the memory budget, halving them together down to 1; entries that set `parallel` are never changed
    (check_budget refuses them if they do not fit)."""
    budget, source = _budget(memory_budget_mb)
    defaulted = [m for m in served if m.spec.engine == "ggml" and m.spec.parallel is None]
    if budget is None or not defaulted:
        return served
    slots = defaulted[0].spec.slots
    lowered = {id(m) for m in defaulted}

    def with_slots(n: int) -> list[ServedModel]:
        return [replace(m, spec=m.spec.model_copy(update={"parallel": n})) if id(m) in lowered else m
                for m in served]

    fitted = with_slots(slots)
    while slots > 1 and sum(m.spec.workers * process_bytes(m) for m in fitted) > budget:
        slots //= 2
        fitted = with_slots(slots)
    if slots < defaulted[0].spec.slots:
        log.warning("parallel %d (not the default %d) for %s: that is what fits in the memory budget of %s (%s); "
                    "set `parallel` to choose", slots, defaulted[0].spec.slots,
                    ", ".join(m.spec.id for m in defaulted), _size(budget), source)
    return fitted


def check_budget(path: Path, served: list[ServedModel], max_workers: int | None,
                 memory_budget_mb: int | None) -> None:
    """RegistryError when the served entries need more than max_workers workers or memory_budget_mb.

    None skips a check; memory_budget_mb=0 means the machine's memory (MemTotal, or the cgroup limit).
    """
    workers = sum(m.spec.workers for m in served)
    if max_workers is not None and workers > max_workers:
        raise RegistryError(
            f"{path}: the served models need {workers:,} worker processes in all, more than max_workers "
            f"({max_workers:,}); lower `workers` in the registry, remove entries, or raise --max-workers "
            f"(env GPT4ALL_J_MAX_WORKERS)")
    budget, source = _budget(memory_budget_mb)
    if budget is None or not served:
        return  # unchecked, or the machine's memory is unknown: nothing to compare with
    needs = sorted(((m.spec.workers * process_bytes(m), m) for m in served), key=lambda t: -t[0])
    total = sum(n for n, _ in needs)
    if total <= budget:
        return
    parts = [_itemise(m) for _, m in needs[:_SHOWN]]
    if len(needs) > _SHOWN:
        parts.append(f"and {len(needs) - _SHOWN:,} more")
    batched = any(m.spec.engine == "ggml" for m in served)
    lower = "`workers`, or `parallel` or `context_length` of engine: ggml entries" if batched else "`workers`"
    raise RegistryError(
        f"{path}: the served models need an estimated {_size(total)} for {workers:,} worker(s), more than "
        f"the memory budget of {_size(budget)} ({source}): {'; '.join(parts)}. Lower {lower}, remove "
        f"entries (or their files), or set --memory-budget-mb (env GPT4ALL_J_MEMORY_BUDGET_MB)")
