"""One request, many jobs: the queue timeout ends when it starts, the time limit is per request;
corrupt weights (NaN) end a request with a clear JSON error."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.e2e.conftest import start_server, stop_server
from tests.models import NO_EOS
from tests.models_corrupt import write_nan_model
from tests.schemas import validate

QUEUE_TIMEOUT = 1
REQUEST_TIMEOUT = 3


@pytest.fixture(scope="module")
def srv(model_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("requests")
    nan = write_nan_model(d / "nan.bin")
    registry = d / "registry.yaml"
    registry.write_text(
        f"models:\n  - {{id: slow, path: {model_files['slow']}, prompt_template: plain, workers: 1, max_queue: 8}}\n"
        f"  - {{id: nan, path: {nan}, prompt_template: plain, workers: 1}}\n")
    env = {"GPT4ALL_J_QUEUE_TIMEOUT": str(QUEUE_TIMEOUT), "GPT4ALL_J_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT)}
    server = start_server(registry, d / "server.log", extra_env=env)
    yield server
    stop_server(server)


def test_a_started_request_is_not_timed_out_by_its_own_queued_choices(srv):
    """n=3 on one worker takes longer than the queue timeout; its later choices wait for the first."""
    t0 = time.monotonic()
    r = httpx.post(srv.url + "/completions", timeout=60, json={
        "model": "slow", "prompt": "Once", "n": 3, "max_tokens": 1000, **NO_EOS})
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    assert elapsed > QUEUE_TIMEOUT
    print(f"\nn=3 request took {elapsed:.1f}s with a {QUEUE_TIMEOUT}s queue timeout")


def test_the_request_timeout_is_one_deadline_for_all_choices(srv):
    """2 prompts x n=4 = 8 jobs on one worker: about one request timeout in all, not 8."""
    t0 = time.monotonic()
    r = httpx.post(srv.url + "/completions", timeout=120, json={
        "model": "slow", "prompt": ["Once", "Upon"], "n": 4, "max_tokens": 1800, **NO_EOS})
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 8 and all(c["finish_reason"] == "length" for c in choices)
    assert r.json()["usage"]["completion_tokens"] < 8 * 1800
    assert elapsed < REQUEST_TIMEOUT + 10, f"{elapsed:.1f}s (per-choice limits would take ~{8 * REQUEST_TIMEOUT}s)"
    print(f"\n8 choices with a {REQUEST_TIMEOUT}s request timeout took {elapsed:.1f}s")


def _strict(text: str):
    def refuse(constant: str):
        raise AssertionError(f"invalid JSON constant {constant} in {text[:200]}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("logprobs", [None, 2])
def test_nan_weights_give_a_json_error_not_nan(srv, logprobs):
    r = httpx.post(srv.url + "/completions", timeout=30, json={
        "model": "nan", "prompt": "Once", "max_tokens": 5, "logprobs": logprobs})
    assert r.status_code == 500
    body = _strict(r.text)
    validate("error", body)
    assert "non-finite logits" in body["error"]["message"] and "corrupt" in body["error"]["message"]


def test_nan_weights_end_a_stream_with_an_error_event_then_done(srv):
    body = {"model": "nan", "prompt": "Once", "max_tokens": 5, "stream": True, "logprobs": 2}
    with httpx.stream("POST", srv.url + "/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        payloads = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    error = _strict(payloads[-2])
    validate("error", error)
    assert "non-finite logits" in error["error"]["message"]
    for p in payloads[:-1]:
        _strict(p)
    # the worker survives: the model keeps answering (with the same clear error)
    again = httpx.post(srv.url + "/completions", json={"model": "nan", "prompt": "x", "max_tokens": 2}, timeout=30)
    assert again.status_code == 500 and "non-finite" in again.json()["error"]["message"]
