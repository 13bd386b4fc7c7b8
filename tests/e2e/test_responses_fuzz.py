"""Schemathesis fuzzing of the Responses API endpoints against the live server's own OpenAPI schema (as
tests/e2e/test_fuzz.py does for chat): no 5xx, every 4xx OpenAI's error body, every 200 a valid Response,
every stream typed events that validate, ending with a final event and data: [DONE]; no traceback logged."""

from __future__ import annotations

import collections
import json
import re

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.e2e.test_fuzz import _error_shape, _short, _tracebacks
from tests.e2e.test_responses import responses_server  # noqa: F401 (fixture)
from tests.schemas import validate

POS, NEG = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
PLAN = [("POST", "/v1/responses", POS, 150), ("POST", "/v1/responses", NEG, 100),
        ("GET", "/v1/responses/{response_id}", POS, 20), ("DELETE", "/v1/responses/{response_id}", POS, 20),
        ("GET", "/v1/responses/{response_id}/input_items", NEG, 30)]
FINAL = {"response.completed", "response.incomplete", "response.failed"}


def _steer(case, data, stored: list[str]) -> None:
    """Mostly served models with small budgets; path ids sometimes real stored ones."""
    if "response_id" in (case.path_parameters or {}) and stored and data.draw(st.booleans(), label="real id"):
        case.path_parameters["response_id"] = data.draw(st.sampled_from(stored), label="id")
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str) and data.draw(st.sampled_from([True, True, False]), label="served"):
        body["model"] = data.draw(st.sampled_from(["succ", "rand"]), label="model")
    budget = body.get("max_output_tokens")
    if body.get("model") == "rand" and not (type(budget) is int and budget > 4096):
        body["max_output_tokens"] = data.draw(st.integers(16, 24), label="budget")
    if "input" not in body and data.draw(st.sampled_from([True, True, False]), label="add input"):
        body["input"] = data.draw(st.text(max_size=200), label="input")
    if data.draw(st.sampled_from([True, True, False]), label="neutral"):
        _neutral(body, data)
    if body.get("stream") in (None, False) and data.draw(st.sampled_from([False, True, False]), label="stream"):
        body["stream"] = True


UNSUPPORTED = ("background", "include", "reasoning", "truncation", "service_tier", "prompt", "conversation",
               "context_management", "max_tool_calls", "top_logprobs", "prompt_cache_key", "prompt_cache_retention",
               "moderation", "stream_options", "text", "tools", "tool_choice", "metadata")


def _neutral(body: dict, data) -> None:
    """Drop the fields answered with unsupported_parameter and make input text or text messages, so generation
    is reached (removing optional fields keeps a positive case positive)."""
    for field in UNSUPPORTED:
        body.pop(field, None)
    if isinstance(body.get("input"), list):
        body["input"] = [{"role": data.draw(st.sampled_from(["user", "system", "developer", "assistant"])),
                          "content": str(item)[:200]} for item in body["input"][:4]] or "hi"


def _check_stream(text: str) -> list[tuple[str, str]]:
    # SSE ends lines with CR, LF or CRLF only (splitlines would also split inside a JSON string at U+2028)
    lines = [line for line in re.split(r"\r\n|\r|\n", text) if line and not line.startswith(":")]
    if not lines or lines[-1] != "data: [DONE]":
        return [("stream not ended by [DONE]", _short(lines[-3:]))]
    problems, kind, events = [], None, []
    for line in lines[:-1]:
        if line.startswith("event: "):
            kind = line[len("event: "):]
            continue
        try:
            event = json.loads(line[len("data: "):])
            validate("response_stream_event", event)
            assert event["type"] == kind, f"event: {kind} but data type {event['type']}"
            events.append(event)
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            problems.append(("bad stream event", f"{type(exc).__name__}: {_short(str(exc), 300)}"))
    if events and events[-1]["type"] not in FINAL:
        problems.append(("stream without a final event", events[-1]["type"]))
    if events and events[-1]["type"] == "response.failed":
        problems.append(("in-stream failure", _short(json.dumps(events[-1]["response"]["error"]))))
    return problems


def _check(method: str, path: str, response) -> list[tuple[str, str]]:
    status = response.status_code
    text = response.content.decode("utf-8", errors="replace")
    if status >= 500:
        return [("5xx", f"status {status}")] + _error_shape(text)
    if status >= 400:
        return _error_shape(text)
    if (response.headers.get("content-type") or [""])[0].startswith("text/event-stream"):
        return _check_stream(text)
    try:
        body = json.loads(text)
        if method == "POST" or path == "/v1/responses/{response_id}" and method == "GET":
            validate("response", body)
    except Exception as exc:  # noqa: BLE001
        return [("2xx body not OpenAI's shape", f"{type(exc).__name__}: {_short(str(exc), 300)}")]
    return []


def test_responses_fuzz(responses_server):
    server = responses_server
    # schemathesis stops reading an event stream after 20 events unless told: read every stream whole
    config = schemathesis.Config.from_dict({"seed": 0, "request-timeout": 60, "max-stream-events": 100_000})
    schema = schemathesis.openapi.from_url(server.base + "/openapi.json", config=config)
    stored = [httpx.post(server.url + "/responses", json={"model": "succ", "input": "hi"}, timeout=30).json()["id"]
              for _ in range(3)]
    counts: collections.Counter = collections.Counter()
    failures: list[str] = []
    reasons: collections.Counter = collections.Counter()
    session = requests.Session()
    log_start = len(server.logs())

    def fuzz(method: str, path: str, mode: GenerationMode, examples: int) -> None:
        @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=schema[path][method].as_strategy(mode), data=st.data())
        def run(case, data):
            _steer(case, data, stored)
            try:
                response = case.call(base_url=server.base, session=session, timeout=60)
            except requests.RequestException as exc:
                failures.append(f"transport error on {method} {path}: {exc}")
                return
            counts[(method, path, response.status_code)] += 1
            if response.status_code == 400:
                reasons[(response.json()["error"]["param"], response.json()["error"]["message"][:90])] += 1
            for kind, detail in _check(method, path, response):
                failures.append(f"[{kind}] {method} {path}: {detail}\n  request: {_short(case.body, 600)}\n"
                                f"  response: {_short(response.text)}")

        run()

    for method, path, mode, examples in PLAN:
        fuzz(method, path, mode, examples)
    print(dict(counts), reasons.most_common(20))
    assert server.proc.poll() is None
    failures += [f"server logged a traceback:\n{b}" for b in _tracebacks(server.logs()[log_start:])[:3]]
    assert counts[("POST", "/v1/responses", 200)] >= 30, dict(counts)
    if failures:
        pytest.fail(f"{len(failures)} failures:\n" + "\n".join(failures[:10]), pytrace=False)
