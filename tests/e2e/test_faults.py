"""A worker that dies mid-request: that request alone fails, in the OpenAI error shape."""

import json
import os
import signal
import time

import httpx

from tests.schemas import validate


def worker_pid(server, model: str) -> int:
    r = httpx.get(server.base + "/ready", timeout=10)
    return r.json()["models"][model]["worker_pids"][0]


def wait_ready(server, model: str, old_pid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = httpx.get(server.base + "/ready").json()["models"][model]
        if pids["alive"] and old_pid not in pids["worker_pids"]:
            return
        time.sleep(0.1)
    raise AssertionError("no replacement worker")


def test_killed_worker_ends_the_stream_with_an_error_event_then_done(client, server):
    pid = worker_pid(server, "slow")
    body = {"model": "slow", "prompt": "Once", "max_tokens": 1800, "stream": True}
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
    r = client.post("/completions", json={"model": "slow", "prompt": "Once", "max_tokens": 1800})
    killer.join()
    assert r.status_code == 500
    validate("error", r.json())
    assert r.json()["error"]["code"] == "internal_error"
    wait_ready(server, "slow", pid)
