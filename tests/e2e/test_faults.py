"""A worker that dies mid-request: that request alone fails, in the OpenAI error shape."""

import json
import os
import signal
import time

import httpx

from tests.schemas import validate
from tests.models import NO_EOS


def worker_pid(server, model: str) -> int:
    r = httpx.get(server.base + "/ready", timeout=10)
    return r.json()["models"][model]["worker_pids"][0]


def wait_ready(server, model: str, old_pid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = httpx.get(server.base + "/ready").json()["models"][model]
        if pids["alive"] == pids["workers"] and old_pid not in pids["worker_pids"]:
            return
        time.sleep(0.02)
    raise AssertionError("no replacement worker")


def test_killed_worker_ends_the_stream_with_an_error_event_then_done(client, server):
    pid = worker_pid(server, "slow")
    body = {"model": "slow", "prompt": "Once", "max_tokens": 1800, "stream": True, **NO_EOS}
    payloads = []
    with httpx.stream("POST", server.url + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            payloads.append(line[6:])
            if len(payloads) == 3:
                os.kill(pid, signal.SIGKILL)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])
    validate("error", error)
    assert error["error"]["type"] == "server_error"
    for p in payloads[:-2]:
        validate("completion_chunk", json.loads(p))
    wait_ready(server, "slow", pid)
    r = client.post("/completions", json={"model": "slow", "prompt": "Once", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_killed_worker_fails_a_plain_request_with_500(client, server):
    pid = worker_pid(server, "slow")

    import threading
    killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
    killer.start()
    r = client.post("/completions", json={"model": "slow", "prompt": "Once", "max_tokens": 1800, **NO_EOS})
    killer.join()
    assert r.status_code == 500
    validate("error", r.json())
    assert r.json()["error"]["code"] == "internal_error"
    wait_ready(server, "slow", pid)


def test_kill_one_of_two_workers_mid_stream_only_its_request_fails(model_files, tmp_path):
    """Two streams on two workers; one worker is SIGKILLed: its stream ends with an error event and
    [DONE], the other stream completes, and a replacement serves the next request."""
    import threading

    from tests.e2e.conftest import start_server, stop_server

    registry = tmp_path / "registry.yaml"
    registry.write_text(f"models:\n  - {{id: slow, path: {model_files['slow']}, prompt_template: plain, "
                        f"workers: 2}}\n")
    srv = start_server(registry, tmp_path / "server.log")
    try:
        victim = worker_pid(srv, "slow")
        results: dict[int, list[str]] = {}
        started = threading.Barrier(3)

        def run(i: int) -> None:
            body = {"model": "slow", "prompt": "Once", "max_tokens": 500, "stream": True, "seed": i, **NO_EOS}
            payloads: list[str] = []
            with httpx.stream("POST", srv.url + "/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        payloads.append(line[6:])
                        if len(payloads) == 2:
                            started.wait()
            results[i] = payloads

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        started.wait()
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_ready(srv, "slow", victim)
        restart = time.monotonic() - killed_at
        for t in threads:
            t.join(60)
        outcomes = sorted("error" in json.loads(p[-2]) for p in results.values())
        assert outcomes == [False, True], results
        for payloads in results.values():
            assert payloads[-1] == "[DONE]"
            last = json.loads(payloads[-2])
            if "error" in last:
                validate("error", last)
            else:
                assert last["choices"][0]["finish_reason"] == "length"
        r = httpx.post(srv.url + "/completions", json={"model": "slow", "prompt": "Once", "max_tokens": 4},
                       timeout=30)
        assert r.status_code == 200
        print(f"\nreplacement worker ready {restart:.2f}s after the kill")
    finally:
        stop_server(srv)
