"""Workers that hang or cannot be restarted: detected, replaced, retried, and explained."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ROOT, Server, free_port, start_server, stop_server, wait_for
from tests.e2e.test_faults import wait_ready, worker_pid
from tests.models import NO_EOS
from tests.schemas import validate


ENGINES = {"ctransformers": "engine: ctransformers", "ggml": "engine: ggml, parallel: 1"}  # one slot: same queueing


def _server(model_files, d, workers_env: dict[str, str], max_queue: int = 2, engine: str = "ctransformers"):
    model = d / "slow.bin"
    shutil.copy(model_files["slow"], model)
    registry = d / "registry.yaml"
    registry.write_text(f"models:\n  - {{id: slow, path: {model}, prompt_template: plain, workers: 1, "
                        f"max_queue: {max_queue}, {ENGINES[engine]}}}\n")
    return start_server(registry, d / "server.log", extra_env=workers_env), model


@pytest.fixture(scope="module", params=sorted(ENGINES))
def stalling(model_files, tmp_path_factory, request):
    srv, _ = _server(model_files, tmp_path_factory.mktemp("stall"), {"GPT4ALL_J_WORKER_STALL_TIMEOUT": "2"},
                     engine=request.param)
    yield srv
    stop_server(srv)


def test_a_stopped_worker_is_detected_its_stream_ends_with_an_error_and_the_queue_is_served(stalling):
    pid = worker_pid(stalling, "slow")
    body = {"model": "slow", "prompt": "Once", "max_tokens": 1800, "stream": True, **NO_EOS}
    queued: list = []
    behind = threading.Thread(target=lambda: queued.append(httpx.post(
        stalling.url + "/completions", json={"model": "slow", "prompt": "x", "max_tokens": 4, **NO_EOS},
        timeout=60)))
    payloads: list[str] = []
    with httpx.stream("POST", stalling.url + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            payloads.append(line[6:])
            if len(payloads) == 2:
                behind.start()
                assert wait_for(lambda: httpx.get(stalling.base + "/ready").json()["models"]["slow"]["queued"],
                                timeout=30)
                os.kill(pid, signal.SIGSTOP)
                stopped_at = time.monotonic()
    detected = time.monotonic() - stopped_at
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])
    validate("error", error)
    assert "stopped making progress" in error["error"]["message"]
    assert detected < 30
    wait_ready(stalling, "slow", pid)
    behind.join(60)
    assert queued[0].status_code == 200 and queued[0].json()["usage"]["completion_tokens"] == 4
    r = httpx.post(stalling.url + "/completions", json={"model": "slow", "prompt": "x", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200
    logs = stalling.logs()
    assert "made no progress" in logs and "was killed by signal 9 (SIGKILL)" in logs
    print(f"\nstopped worker detected and its stream ended {detected:.1f}s after SIGSTOP (stall timeout 2s)")


def test_a_restart_that_fails_with_too_many_open_files_is_retried(stalling):
    """The worker dies while the server cannot open files: the restart fails (EMFILE), is logged
    with its reason and retried with backoff; once files can be opened again the model serves."""
    pid = worker_pid(stalling, "slow")
    server = stalling.proc.pid
    soft, hard = resource.prlimit(server, resource.RLIMIT_NOFILE)
    resource.prlimit(server, resource.RLIMIT_NOFILE, (0, hard))
    try:
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: "Too many open files" in stalling.logs(), timeout=20)
        time.sleep(1.0)  # at least one more failed attempt
    finally:
        resource.prlimit(server, resource.RLIMIT_NOFILE, (soft, hard))
    wait_ready(stalling, "slow", pid)
    r = httpx.post(stalling.url + "/completions", json={"model": "slow", "prompt": "x", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200
    logs = stalling.logs()
    assert f"(pid {pid}) was killed by signal 9 (SIGKILL)" in logs  # read without opening a file
    assert "could not start a replacement for worker 0: OSError: [Errno 24] Too many open files" in logs
    assert logs.count("retrying in") >= 2


@pytest.fixture(scope="module")
def fragile(model_files, tmp_path_factory):
    env = {"GPT4ALL_J_RESTART_LIMIT": "2", "GPT4ALL_J_RESTART_COOLDOWN": "30"}
    srv, model = _server(model_files, tmp_path_factory.mktemp("fragile"), env)
    yield srv, model
    stop_server(srv)


def test_why_a_replacement_failed_is_logged_and_retry_after_is_the_cooldown_left(fragile):
    """The file is truncated after start; the worker is killed: the replacement cannot load it and
    the log says why. Two crashes make the model unavailable for 30 s: Retry-After says so."""
    srv, model = fragile
    pid = worker_pid(srv, "slow")
    with open(model, "r+b") as f:
        f.truncate(model.stat().st_size - 4096)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: "could not load the model" in srv.logs(), timeout=30)
    assert wait_for(lambda: "crashed 2 times" in srv.logs(), timeout=30)
    r = httpx.post(srv.url + "/completions", json={"model": "slow", "prompt": "x", "max_tokens": 3}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
    assert 20 <= int(r.headers["retry-after"]) <= 30, r.headers["retry-after"]
    logs = srv.logs()
    assert "was killed by signal 9 (SIGKILL)" in logs
    assert "truncated" in logs.split("could not load the model", 1)[1].splitlines()[0]
    assert "code None" not in logs


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _is_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"spawn_main" in cmdline and b"resource_tracker" not in cmdline


def test_a_model_whose_first_load_times_out_is_retried_and_then_serves(model_files, tmp_path):
    """On a busy machine the first load can exceed --load-timeout (here: the worker is stopped while
    loading): the model is not given up on; the start is retried and the model serves."""
    model = tmp_path / "slow.bin"
    shutil.copy(model_files["slow"], model)
    registry = tmp_path / "registry.yaml"
    registry.write_text(f"models:\n  - {{id: slow, path: {model}, prompt_template: plain, workers: 1, "
                        f"engine: ctransformers}}\n")
    port, log = free_port(), tmp_path / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GPT4ALL_J_DEFAULT_THREADS": "1", "GPT4ALL_J_LOAD_TIMEOUT": "3"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--registry", str(registry), "--port",
                                 str(port), "--host", "127.0.0.1"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        stuck = None
        deadline = time.monotonic() + 60
        while stuck is None:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            stuck = next((c for c in _children(proc.pid) if _is_worker(c)), None)
            time.sleep(0.001)
        os.kill(stuck, signal.SIGSTOP)  # just spawned: it cannot have loaded the model yet
        assert wait_for(lambda: _ready(srv), timeout=90), log.read_text()
        assert stuck not in httpx.get(srv.base + "/ready").json()["models"]["slow"]["worker_pids"]
        r = httpx.post(srv.url + "/completions", json={"model": "slow", "prompt": "x", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200
        logs = srv.logs()
        assert "did not load the model within 3s (load_timeout); retrying in 0.5s" in logs
        assert "model slow is serving after 1 failed attempt" in logs
    finally:
        stop_server(srv)


def _ready(srv) -> bool:
    try:
        return httpx.get(srv.base + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
