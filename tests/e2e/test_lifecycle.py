"""Crash loops back off; SIGTERM drains in-flight streams; no worker outlives the server."""

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import REGISTRY, start_server, stop_server, wait_for
from tests.models import NO_EOS


def make_server(model_files, d: Path, **env) -> object:
    registry = d / "registry.yaml"
    registry.write_text(REGISTRY.format(**{k: str(v) for k, v in model_files.items()}))
    return start_server(registry, d / "server.log", extra_env={f"GPT4ALL_J_{k.upper()}": str(v)
                                                               for k, v in env.items()})


def worker_pids(srv) -> list[int]:
    models = httpx.get(srv.base + "/ready", timeout=10).json()["models"]
    return [pid for m in models.values() for pid in m["worker_pids"]]


def gone(pid: int) -> bool:
    """The process no longer exists at all (a zombie still has /proc/<pid>, so it is not gone)."""
    return not Path(f"/proc/{pid}").exists()


def test_crash_loop_marks_the_model_unavailable_then_recovers(model_files, tmp_path):
    srv = make_server(model_files, tmp_path, restart_limit=3, restart_window=60, restart_cooldown=2)
    try:
        for _ in range(3):
            pid = httpx.get(srv.base + "/ready").json()["models"]["succ"]["worker_pids"][0]
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: pid not in worker_pids(srv) and (
                httpx.get(srv.base + "/ready").json()["models"]["succ"]["worker_pids"]
                or not httpx.get(srv.base + "/ready").json()["models"]["succ"]["available"]))
        ready = httpx.get(srv.base + "/ready")
        assert ready.status_code == 503 and "succ" in ready.json()["missing"]
        assert "succ" not in [m["id"] for m in httpx.get(srv.url + "/models").json()["data"]]
        r = httpx.post(srv.url + "/completions", json={"model": "succ", "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
        assert "retry-after" in r.headers
        # other models keep serving meanwhile
        assert httpx.post(srv.url + "/completions", json={"model": "rand", "prompt": "x"}).status_code == 200
        # after the cooldown a fresh worker is started and the model serves again
        assert wait_for(lambda: httpx.get(srv.base + "/ready").status_code == 200, timeout=15)
        r = httpx.post(srv.url + "/completions", json={"model": "succ", "prompt": "x"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "yz"
        assert "crashed 3 times" in srv.logs()
    finally:
        stop_server(srv)


def test_sigterm_lets_in_flight_streams_finish_and_leaves_no_processes(model_files, tmp_path):
    srv = make_server(model_files, tmp_path, shutdown_grace=20)
    pids = worker_pids(srv)
    assert len(pids) == 4
    payloads = []
    with httpx.stream("POST", srv.url + "/completions", timeout=60, json={
            "model": "slow", "prompt": "Once", "max_tokens": 400, "stream": True, **NO_EOS}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                payloads.append(line[6:])
                if len(payloads) == 2:
                    srv.proc.send_signal(signal.SIGTERM)
                    time.sleep(0.3)
                    with pytest.raises(httpx.ConnectError):  # no new connections once draining
                        httpx.get(srv.base + "/health", timeout=2)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"][0]["text"]) >= 300  # the whole answer arrived
    # uvicorn re-raises the signal after a clean shutdown, so the exit status is "killed by SIGTERM"
    assert srv.proc.wait(30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in srv.logs()
    assert wait_for(lambda: all(gone(p) for p in pids), timeout=10), [p for p in pids if not gone(p)]


def test_sigkill_of_the_server_leaves_no_orphan_workers(model_files, tmp_path):
    srv = make_server(model_files, tmp_path)
    pids = worker_pids(srv)
    srv.proc.kill()
    srv.proc.wait(10)
    assert wait_for(lambda: all(gone(p) for p in pids), timeout=15), [p for p in pids if not gone(p)]
