"""The global worker cap: a registry whose workers, or their estimated memory, cannot fit is refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from backends import registry_budget
from backends.ggml.reader import inspect_model
from backends.registry import RegistryError, resolve
from backends.registry_budget import WORKER_OVERHEAD, kv_cache_bytes, machine_memory, worker_bytes
from tests.models import write_random, write_successor


def many(tmp_path: Path, n: int, workers: int = 1) -> Path:
    write_successor(tmp_path / "m.bin")
    path = tmp_path / "reg.yaml"
    path.write_text("models:\n" + "".join(f"  - {{id: m{i}, path: m.bin, workers: {workers}, threads: 1, "
                                          f"engine: ctransformers}}\n"
                                          for i in range(n)))
    return path


def test_more_workers_than_max_workers_is_refused_naming_the_numbers(tmp_path):
    path = many(tmp_path, 40, workers=2)
    with pytest.raises(RegistryError) as err:
        resolve(path, max_workers=64)
    assert str(err.value).startswith(f"{path}: the served models need 80 worker processes in all, more than "
                                     f"max_workers (64)")
    assert len(resolve(path, max_workers=80).served) == 40
    assert len(resolve(path).served) == 40  # existing callers: no cap unless asked


def test_only_served_entries_count(tmp_path):
    path = many(tmp_path, 3)
    path.write_text(path.read_text() + "".join(f"  - {{id: gone{i}, path: gone.bin, workers: 64}}\n"
                                               for i in range(10)))
    assert len(resolve(path, max_workers=3, memory_budget_mb=0).served) == 3


def test_memory_budget_names_workers_estimate_total_and_budget(tmp_path):
    path = many(tmp_path, 3, workers=2)
    info = inspect_model(tmp_path / "m.bin")
    each = info.file_size + kv_cache_bytes(info) + WORKER_OVERHEAD
    with pytest.raises(RegistryError) as err:
        resolve(path, memory_budget_mb=100)
    message = str(err.value)
    total_mib = round(6 * each / 2**20)
    assert f"need an estimated {total_mib} MiB for 6 worker(s), more than the memory budget of 100 MiB " \
           f"(--memory-budget-mb)" in message, message
    kv = 2 * info.n_layer * info.n_ctx * info.n_embd * 2
    assert f"m0 2 x {round(each / 2**20)} MiB (file {round(info.file_size / 1024)} KiB + KV cache " \
           f"{round(kv / 1024)} KiB + process 64 MiB)" in message, message
    assert len(resolve(path, memory_budget_mb=total_mib + 1).served) == 3


def test_a_budget_of_zero_is_the_machines_memory(tmp_path, monkeypatch):
    path = many(tmp_path, 2)
    assert len(resolve(path, memory_budget_mb=0).served) == 2  # 2 small workers fit this machine
    monkeypatch.setattr(registry_budget, "machine_memory", lambda: (100 * 2**20, "the cgroup memory limit"))
    with pytest.raises(RegistryError, match=r"more than the memory budget of 100 MiB \(the cgroup memory limit\)"):
        resolve(path, memory_budget_mb=0)


def test_the_machines_memory_is_memtotal_or_a_lower_cgroup_limit(monkeypatch):
    total, source = machine_memory()
    assert total and total > 64 * 2**20 and source in ("the machine's MemTotal", "the cgroup memory limit")
    monkeypatch.setattr(registry_budget, "_mem_total", lambda: 8 << 30)
    monkeypatch.setattr(registry_budget, "_cgroup_limits", lambda: [2 << 30, 4 << 30])
    assert machine_memory() == (2 << 30, "the cgroup memory limit")
    monkeypatch.setattr(registry_budget, "_cgroup_limits", lambda: [])
    assert machine_memory() == (8 << 30, "the machine's MemTotal")


def test_gpt_j_6b_estimate():
    """GPT-J 6B q4_0 (converted GPT4All-J): 3.4 GB of weights + 896 MiB of f16 KV cache at n_ctx 2048."""
    info = SimpleNamespace(n_layer=28, n_ctx=2048, n_embd=4096, file_size=3_407_121_945)
    assert kv_cache_bytes(info) == 896 * 2**20
    assert worker_bytes(info) == 3_407_121_945 + 896 * 2**20 + WORKER_OVERHEAD


GGML_ENTRY = "models:\n  - {{id: big, path: big.bin, engine: ggml, threads: 1{extra}}}\n"


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """n_ctx 2048, n_embd 512, 8 layers: 32 MiB of f16 KV cache per slot at the full context."""
    return write_random(tmp_path_factory.mktemp("big") / "big.bin", n_ctx=2048, n_embd=512, n_layer=8, seed=3)


def ggml_registry(tmp_path: Path, big: Path, extra: str = "") -> Path:
    (tmp_path / "big.bin").symlink_to(big)
    path = tmp_path / "reg.yaml"
    path.write_text(GGML_ENTRY.format(extra=extra))
    return path


def test_a_ggml_entry_counts_one_kv_cache_per_slot_of_the_served_context(tmp_path, big_model):
    """parallel 8 at context 2048: 8 x 32 MiB of KV cache, not the one cache a ctransformers worker holds."""
    path = ggml_registry(tmp_path, big_model, ", parallel: 8")
    info = inspect_model(big_model)
    one_cache = info.file_size + kv_cache_bytes(info) + WORKER_OVERHEAD  # what a worker of one slot needs
    assert one_cache < 200 * 2**20
    with pytest.raises(RegistryError) as err:
        resolve(path, memory_budget_mb=200)
    message = str(err.value)
    assert "KV cache 8 slots x 2048 positions x f16 = 256.0 MiB" in message, message
    assert "Lower `workers`, or `parallel` or `context_length` of engine: ggml entries" in message, message
    served = resolve(path, memory_budget_mb=1000).served[0]
    kv = 2 * 8 * 8 * 2048 * 512 * 2
    compute = 16 * 4 * ((8 + 32) * 2048 * 4 + 4 * 512 * (8 + 32) + 9 * 512)
    assert registry_budget.process_bytes(served) == info.file_size + kv + compute + WORKER_OVERHEAD


def test_a_ggml_entry_is_sized_from_its_context_length(tmp_path, big_model):
    path = ggml_registry(tmp_path, big_model, ", parallel: 8, context_length: 256")
    served = resolve(path, memory_budget_mb=200).served[0]  # 8 slots x 256 positions = 32 MiB
    need = registry_budget.batched_memory(served)
    assert (need.n_slots, need.n_ctx, need.kv_cache) == (8, 256, 32 * 2**20)
    assert need.kv_text() == "8 slots x 256 positions x f16 = 32.0 MiB"


def test_the_registry_and_the_engine_share_one_formula(tmp_path, big_model):
    """The engine's own check (backends.batched.engine.estimate) gives the same KV cache and compute."""
    from backends.batched.memory import engine_memory

    served = resolve(ggml_registry(tmp_path, big_model, ", parallel: 3, context_length: 100"),
                     memory_budget_mb=1000).served[0]
    info = served.info
    assert registry_budget.batched_memory(served) == engine_memory(
        info.file_size, info.n_layer, info.n_embd, info.n_head, info.n_vocab, info.n_ctx, 3, 100)


def test_ctransformers_keeps_one_cache_of_the_files_context(tmp_path, big_model):
    """ctransformers ignores context_length for GPT-J: its cache is the file's n_ctx, one per worker."""
    (tmp_path / "big.bin").symlink_to(big_model)
    path = tmp_path / "reg.yaml"
    path.write_text("models:\n  - {id: ct, path: big.bin, context_length: 256, threads: 1, engine: ctransformers}\n")
    served = resolve(path, memory_budget_mb=1000).served[0]
    assert registry_budget.process_bytes(served) == worker_bytes(served.info)
    assert kv_cache_bytes(served.info) == 32 * 2**20


def test_the_default_parallel_is_lowered_to_what_fits_and_says_so(tmp_path, big_model, caplog):
    """No `parallel`: 8 slots x 32 MiB do not fit 200 MiB, so the slots halve until they do (the warning
    says how many and why); the same budget refuses an entry that sets parallel: 8 (test above)."""
    path = ggml_registry(tmp_path, big_model)
    assert resolve(path, memory_budget_mb=1000).served[0].spec.slots == 8  # fits: the default
    with caplog.at_level("WARNING", logger="backends.registry_budget"):
        served = resolve(path, memory_budget_mb=200).served[0]
    assert served.spec.slots == 2 and served.spec.parallel == 2
    assert registry_budget.process_bytes(served) <= 200 * 2**20
    assert "parallel 2 (not the default 8) for big" in caplog.text and "--memory-budget-mb" in caplog.text
    with pytest.raises(RegistryError):  # not even one slot fits: refused as before, naming the slot
        resolve(path, memory_budget_mb=40)


def test_gpt4all_j_at_context_2048_needs_about_11_gib_with_8_slots_and_under_8_with_4():
    """GPT-J 6B q4_0 at context 2048 (896 MiB per slot): 8 slots need ~11 GiB; a 8 GiB budget gets 4."""
    from backends.batched.memory import engine_memory

    def need(slots: int) -> int:
        return engine_memory(3_785_248_281, 28, 4096, 16, 50400, 2048, slots, 2048).total + WORKER_OVERHEAD

    assert 10 * 2**30 < need(8) < 12 * 2**30
    assert need(4) < 8 * 2**30 < need(8)
