"""The batched ggml engine (`engine: ggml`) behind the real server: many streams in one engine process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.batched import require_ggml
from tests.e2e.conftest import ROOT, free_port, serve_registry
from tests.e2e.sse import stream
from tests.models import NO_EOS

require_ggml()

REGISTRY = """
models:
  - id: succ
    path: {succ}
    prompt_template: plain
    sampling: {{temperature: 0}}
    engine: ggml
    parallel: 4
    max_queue: 8
  - id: slow
    path: {slow}
    prompt_template: plain
    engine: ggml
    parallel: 2
    context_length: 512
    max_queue: 4
"""

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SLOW = {"model": "slow", "prompt": "Once upon a time", "temperature": 1.0, **NO_EOS, "seed": 1}


@pytest.fixture(scope="module")
def batched_server(model_files, tmp_path_factory):
    yield from serve_registry(REGISTRY.format(succ=model_files["succ"], slow=model_files["slow"]),
                              tmp_path_factory.mktemp("batched"))


@pytest.fixture()
def bclient(batched_server):
    with httpx.Client(base_url=batched_server.url, timeout=60) as c:
        yield c


def _details(server, model: str) -> dict:
    return httpx.get(server.base + "/ready", timeout=5).json()["models"][model]


def test_one_engine_process_serves_the_model(batched_server):
    m = _details(batched_server, "succ")
    assert m["state"] == "ready" and m["workers"] == 1 and m["alive"] == 1, m
    assert len(m["worker_pids"]) == 1


def test_six_concurrent_streams_all_complete(batched_server):
    """parallel 4: four run together, two wait for a slot; each gets its own successor text and [DONE]."""
    prompts = ["a", "c", "f", "k", "p", "x"]
    results: dict[str, object] = {}

    def run(prompt: str) -> None:
        try:
            with httpx.Client(base_url=batched_server.url, timeout=60) as c:
                chunks, raw = stream(c, "/completions", {"model": "succ", "prompt": prompt, "max_tokens": 40})
            results[prompt] = ("".join(ch["choices"][0]["text"] for ch in chunks), raw[-1],
                               chunks[-1]["choices"][0]["finish_reason"])
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[prompt] = exc

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for p in prompts:
        expected = LETTERS[LETTERS.index(p) + 1:]
        assert results[p] == (expected, "[DONE]", "stop"), (p, results[p])


def test_a_non_streamed_completion(bclient):
    r = bclient.post("/completions", json={"model": "succ", "prompt": "x", "max_tokens": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == "yz" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 2


def test_client_closed_streams_free_their_slots(batched_server, bclient):
    """Both slots held by streams whose clients left: they are cancelled at once, so the next request
    runs without waiting for them (finishing them would take about as long as the long request)."""
    t0 = time.monotonic()
    r = bclient.post("/completions", json={**SLOW, "max_tokens": 400})
    full = time.monotonic() - t0
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 400

    streams = [httpx.stream("POST", batched_server.url + "/completions",
                            json={**SLOW, "max_tokens": 450, "stream": True}, timeout=60) for _ in range(2)]
    for s in streams:
        response = s.__enter__()
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
    for s in streams:
        s.__exit__(None, None, None)

    t0 = time.monotonic()
    r = bclient.post("/completions", json={**SLOW, "max_tokens": 4})
    waited = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert waited < full / 2, f"next request waited {waited:.2f}s; 400 tokens take {full:.2f}s"
    deadline = time.monotonic() + 10
    while _details(batched_server, "slow")["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _details(batched_server, "slow")["busy"] == 0
    # the engine process was not replaced: cancelling is not a crash
    assert _details(batched_server, "slow")["restarts"] == 0


def test_streams_of_a_killed_engine_end_with_an_error_and_done(batched_server):
    """Every stream the engine process held ends with an error event and [DONE]; a replacement serves."""
    pid = _details(batched_server, "slow")["worker_pids"][0]
    results: list = []
    streaming = [threading.Event(), threading.Event()]  # set once a stream has begun (its first event)

    def run(begun: threading.Event) -> None:
        try:
            with httpx.stream("POST", batched_server.url + "/completions",
                              json={**SLOW, "max_tokens": 450, "stream": True}, timeout=60) as r:
                assert r.status_code == 200, r.read()
                payloads = []
                for line in r.iter_lines():
                    if not line or line.startswith(":"):
                        continue
                    assert line.startswith("data: "), f"not an SSE data line: {line!r}"
                    payloads.append(line[len("data: "):])
                    begun.set()
                results.append(payloads)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results.append(exc)
        finally:
            begun.set()

    threads = [threading.Thread(target=run, args=(e,)) for e in streaming]
    for t in threads:
        t.start()
    for e in streaming:  # kill only once both streams are under way (before that, a failure is an HTTP error)
        e.wait(30)
    os.kill(pid, 9)
    for t in threads:
        t.join(60)
    assert len(results) == 2
    for raw in results:
        assert isinstance(raw, list), raw
        assert raw[-1] == "[DONE]" and '"error"' in raw[-2], raw[-3:]
    deadline = time.monotonic() + 30
    while _details(batched_server, "slow")["alive"] != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    r = httpx.post(batched_server.url + "/completions", json={**SLOW, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text


def test_parallel_with_the_ctransformers_engine_is_refused_at_start(tmp_path, model_files):
    registry = tmp_path / "registry.yaml"
    registry.write_text(f"models:\n  - id: succ\n    path: {model_files['succ']}\n    engine: ctransformers\n"
                        f"    parallel: 4\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GPT4ALL_J_")}
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--registry", str(registry), "--host", "127.0.0.1",
         "--port", str(free_port())],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "models[0] (id 'succ'): field 'parallel'" in output and "ggml" in output, output
    assert "Traceback" not in output, output
