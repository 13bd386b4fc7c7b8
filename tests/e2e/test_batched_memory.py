"""The batched engine's memory behind the real server: reported at start, estimated before start, refused
when its slots do not fit the memory budget."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import httpx
import pytest

from tests.batched import require_ggml
from tests.e2e.conftest import ROOT, free_port, serve_registry
from tests.models import NO_EOS

require_ggml()

REGISTRY = """
models:
  - id: succ
    path: {succ}
    prompt_template: plain
    engine: ggml
    parallel: 4
    context_length: 128
  - id: slow
    path: {slow}
    prompt_template: plain
    engine: ggml
    parallel: 8
"""
# slow: n_ctx 2048, n_embd 512, 8 layers -> 8 slots x 2048 positions x 2 (K, V) x 8 x 512 x 2 bytes = 256 MiB
SLOW_KV = "8 slots x 2048 positions x f16 = 256.0 MiB"
LOADED = re.compile(r"INFO backends\.pool: worker 0 of (\S+) \(pid (\d+)\) loaded the model: weights ([\d.,]+) MiB "
                    r"loaded in [\d.]+ s: ([\d.,]+) MiB repacked in [\d.]+ s \(\d+ tensors\), ([\d.,]+) MiB copied "
                    r"plain in [\d.]+ s; KV cache (\d+ slots x \d+ positions x f16 = [\d.,]+ MiB) allocated "
                    r"and zeroed in [\d.]+ s; engine loaded in [\d.]+ s$", re.M)


@pytest.fixture(scope="module")
def memory_server(model_files, tmp_path_factory):
    yield from serve_registry(REGISTRY.format(succ=model_files["succ"], slow=model_files["slow"]),
                              tmp_path_factory.mktemp("batched-memory"))


def _loaded(server) -> dict[str, re.Match]:
    return {m.group(1): m for m in LOADED.finditer(server.logs())}


def test_the_load_report_reaches_the_server_log(memory_server):
    """Weights with the repack timed, and the KV cache as slots x positions x type = MiB, at the served context."""
    lines = _loaded(memory_server)
    assert set(lines) == {"succ", "slow"}, memory_server.logs()
    assert lines["succ"].group(6) == "4 slots x 128 positions x f16 = 0.2 MiB"  # context_length, not the file's 256
    assert lines["slow"].group(6) == SLOW_KV
    size = _served(memory_server)["slow"].info.file_size
    weights = float(lines["slow"].group(3).replace(",", ""))
    assert weights <= size / 2**20 < weights + 1  # the tensors: the file less its header and vocabulary


def _served(server) -> dict:
    from backends.registry import resolve

    return {m.spec.id: m for m in resolve(server.log.parent / "registry.yaml").served}


def _rss(pid: int, field: str = "VmHWM") -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {pid}")


def test_the_engine_holds_its_kv_cache_and_stays_within_the_estimate(memory_server):
    """After 8 concurrent streams the engine's peak RSS is at least weights + KV cache, at most the estimate."""
    from backends.registry_budget import process_bytes

    pid = int(_loaded(memory_server)["slow"].group(2))
    errors: list[object] = []

    def run() -> None:
        try:
            r = httpx.post(memory_server.url + "/completions", timeout=60, json={
                "model": "slow", "prompt": "Once upon a time", "max_tokens": 16, **NO_EOS})
            assert r.status_code == 200, r.text
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    served = _served(memory_server)
    peak = _rss(pid)
    size = served["slow"].info.file_size
    assert size + 256 * 2**20 <= peak <= process_bytes(served["slow"]), (peak, process_bytes(served["slow"]))


def test_slots_that_do_not_fit_the_memory_budget_are_refused_at_start(tmp_path, model_files):
    registry = tmp_path / "registry.yaml"
    registry.write_text(f"models:\n  - id: slow\n    path: {model_files['slow']}\n    engine: ggml\n"
                        f"    parallel: 8\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GPT4ALL_J_")}
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--registry", str(registry), "--host", "127.0.0.1",
         "--port", str(free_port()), "--memory-budget-mb", "200"],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert f"KV cache {SLOW_KV}" in output and "more than the memory budget of 200 MiB" in output, output
    assert "`parallel` or `context_length`" in output, output
    assert "Traceback" not in output, output
