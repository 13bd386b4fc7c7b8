"""The global worker cap: a registry whose workers, or their estimated memory, cannot fit is refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from backends import registry_budget
from backends.ggml.reader import inspect_model
from backends.registry import RegistryError, resolve
from backends.registry_budget import WORKER_OVERHEAD, kv_cache_bytes, machine_memory, worker_bytes
from tests.models import write_successor


def many(tmp_path: Path, n: int, workers: int = 1) -> Path:
    write_successor(tmp_path / "m.bin")
    path = tmp_path / "reg.yaml"
    path.write_text("models:\n" + "".join(f"  - {{id: m{i}, path: m.bin, workers: {workers}, threads: 1}}\n"
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
