"""Stored responses outlive the server (SQLite in its data folder), the bound on how many are kept holds, and a
worker that dies mid-stream ends the stream with response.failed (then [DONE]), never silence."""

from __future__ import annotations

import json
import os
import signal

import httpx
import openai

from tests.e2e.conftest import start_server, stop_server, wait_for
from tests.e2e.test_faults import wait_ready, worker_pid
from tests.models import write_random
from tests.schemas import validate

REGISTRY = """
models:
  - id: slow
    path: {slow}
    prompt_template: plain
    workers: 1
"""


def _serve(d, env: dict[str, str]):
    registry = d / "registry.yaml"
    if not registry.exists():
        registry.write_text(REGISTRY.format(slow=write_random(d / "slow.bin", n_ctx=2048, n_embd=512, n_layer=8,
                                                              seed=3)))
    return start_server(registry, d / f"server{len(list(d.glob('server*.log')))}.log", env)


def _killed_stream(server) -> list[tuple[str, dict | str]]:
    """Stream a long response and kill its worker after the third text delta; the (event, data) pairs."""
    pid = worker_pid(server, "slow")
    body = {"model": "slow", "input": "Once", "max_output_tokens": 1800, "stream": True}
    out, kind, deltas = [], None, 0
    with httpx.stream("POST", server.url + "/responses", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                data = line[len("data: "):]
                out.append((kind, data if data == "[DONE]" else json.loads(data)))
                kind = None
                deltas += out[-1][0] == "response.output_text.delta"
                if deltas == 3 and out[-1][0] == "response.output_text.delta":
                    os.kill(pid, signal.SIGKILL)
    wait_ready(server, "slow", pid)
    return out


def _abandoned_stream(server) -> None:
    """Read two text deltas of a long stream, then hang up: the worker must be free again (not generating)."""
    body = {"model": "slow", "input": "Once", "max_output_tokens": 1800, "stream": True, "store": False}
    with httpx.stream("POST", server.url + "/responses", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line == "event: response.output_text.delta"
            if seen == 2:
                break
    assert wait_for(lambda: httpx.get(server.base + "/ready").json()["models"]["slow"]["busy"] == 0, 30)
    assert wait_for(lambda: "outcome=client_gone" in server.logs(), 30)
    line = [x for x in server.logs().splitlines() if "outcome=client_gone" in x][-1]
    assert '"POST /v1/responses"' in line and "completion_tokens=1800" not in line


def test_restart_keeps_responses_and_the_bound_holds(tmp_path):
    data = tmp_path / "data"
    env = {"GPT4ALL_J_DATA_DIR": str(data)}
    first = _serve(tmp_path, env)
    try:
        sdk = openai.OpenAI(base_url=first.url, api_key="unused", max_retries=0, timeout=60)
        kept = sdk.responses.create(model="slow", input="hello", max_output_tokens=16)
        failed = _killed_stream(first)
        _abandoned_stream(first)
    finally:
        stop_server(first)
    assert (data / "responses.sqlite3").exists()
    # the killed stream: every event valid, the last one response.failed with a server error, then [DONE]
    assert failed[-1] == (None, "[DONE]")
    assert failed[-2][0] == "response.failed"
    for kind, event in failed[:-1]:
        validate("response_stream_event", event)
        assert event["type"] == kind
    error = failed[-2][1]["response"]["error"]
    assert failed[-2][1]["response"]["status"] == "failed" and error["code"] == "server_error" and error["message"]

    second = _serve(tmp_path, {**env, "GPT4ALL_J_RESPONSES_MAX_STORED": "2", "GPT4ALL_J_MAX_BODY_BYTES": "1024"})
    try:
        sdk = openai.OpenAI(base_url=second.url, api_key="unused", max_retries=0, timeout=60)
        again = sdk.responses.retrieve(kept.id)
        assert again.output_text == kept.output_text and again.usage.total_tokens == kept.usage.total_tokens
        chained = sdk.responses.create(model="slow", input="more", previous_response_id=kept.id,
                                       max_output_tokens=16)
        assert chained.usage.input_tokens > kept.usage.input_tokens + kept.usage.output_tokens
        sdk.responses.create(model="slow", input="third", max_output_tokens=16)  # a bound of 2: the newest two stay
        r = httpx.get(f"{second.url}/responses/{kept.id}")
        assert r.status_code == 404
        validate("error", r.json())
        assert sdk.responses.retrieve(chained.id).id == chained.id
        # one stored row holds at most the body cap: a chain that outgrows it is refused before generation
        big = sdk.responses.create(model="slow", input="x " * 300, max_output_tokens=16)
        r = httpx.post(second.url + "/responses", json={"model": "slow", "input": "y " * 300, "max_output_tokens": 16,
                                                        "previous_response_id": big.id})
        assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id", r.text
        assert r.json()["error"]["code"] == "conversation_too_large"
        unstored = sdk.responses.create(model="slow", input="y " * 300, max_output_tokens=16,
                                        previous_response_id=big.id, store=False)
        assert unstored.store is False and unstored.previous_response_id == big.id
    finally:
        stop_server(second)
