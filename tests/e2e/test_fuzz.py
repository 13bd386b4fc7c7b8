"""Schemathesis fuzzing of the OpenAI endpoints against the running server's own OpenAPI schema.

The schema is read from the live server (GET /openapi.json), so it cannot be loaded at import time; the
test therefore drives schemathesis' Python API directly: `schemathesis.openapi.from_url`, then one
hypothesis run per operation and generation mode over `operation.as_strategy(mode)`, with a fixed
number of examples and `derandomize=True` (the same cases on every run).

Generated cases are steered so that most requests reach generation rather than stopping at a 404:
the `model` field (and the `model_id` path parameter) is usually replaced by a served id or alias, and
token budgets between 17 and 4096 are replaced by small ones (budgets above any context length are kept,
so the context check is still exercised). Nothing about what is checked is relaxed:

- no response is a 5xx (and no request fails at the transport level: no hang, no dropped connection);
- every 4xx body is OpenAI's error body (`validate("error", ...)`);
- every 2xx body is the endpoint's OpenAI response shape; a stream is well-formed SSE ending with
  `data: [DONE]`, each chunk validates, and an in-stream error event has the error shape and is not a
  `server_error`;
- the server logs no traceback while the fuzzer runs, is still alive afterwards and answers normally.

Failures are collected (not raised inside hypothesis, so there is no slow shrinking against a live
server) and reported together, grouped, with the request, the response and the server log.
"""

from __future__ import annotations

import base64
import collections
import json
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.schemas import validate

POS, NEG = GenerationMode.POSITIVE, GenerationMode.NEGATIVE

# (method, path, generation mode, examples). GET /v1/models has no inputs: hypothesis runs it once
# (and a negative case cannot exist), so it is not planned with more.
PLAN = [
    ("POST", "/v1/completions", POS, 400),
    ("POST", "/v1/completions", NEG, 200),
    ("POST", "/v1/chat/completions", POS, 400),
    ("POST", "/v1/chat/completions", NEG, 200),
    ("GET", "/v1/models", POS, 5),
    ("GET", "/v1/models/{model_id}", POS, 250),
    ("POST", "/v1/embeddings", POS, 100),
    ("POST", "/v1/embeddings", NEG, 100),
]
MIN_REQUESTS = 1000
SMALL_BUDGET = 16  # token budgets above this (and within any context) are replaced by 0..16
KEEP_BUDGET_ABOVE = 4096  # above every served context length: the server must reject it quickly
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
ALIASES = ["succ-alias"]  # from the e2e registry (tests/e2e/conftest.py)
UNSERVED = ["absent"]  # registered, file missing: never served
REQUEST_TIMEOUT = 30

SUCCESS_ROOTS = {
    ("POST", "/v1/completions"): ("completion", "completion_chunk"),
    ("POST", "/v1/chat/completions"): ("chat_completion", "chat_chunk"),
    ("GET", "/v1/models"): ("model_list", None),
    ("GET", "/v1/models/{model_id}"): ("model", None),
    ("POST", "/v1/embeddings"): ("embedding_response", None),
}


@dataclass
class Failure:
    kind: str
    method: str
    path: str
    mode: str
    request: str
    status: int | None
    response: str
    detail: str

    def key(self) -> tuple:
        return (self.kind, self.method, self.path, self.status, self.detail[:80])

    def describe(self) -> str:
        return (f"[{self.kind}] {self.method} {self.path} ({self.mode})\n"
                f"  request:  {self.request}\n  status:   {self.status}\n"
                f"  response: {self.response}\n  detail:   {self.detail}")


def _short(value: object, limit: int = 400) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


KEEP = object()  # "leave the generated value alone"
# optional chat fields this server rejects unless neutral, and message fields it cannot template
CHAT_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "response_format", "modalities",
                    "audio", "prediction", "reasoning_effort", "verbosity", "service_tier", "store",
                    "metadata", "web_search_options", "prompt_cache_key")
MESSAGE_UNSUPPORTED = ("tool_calls", "function_call", "audio", "name")
ROLES = ["user", "system", "assistant", "developer"]


def _steer(case, data, names: list[str]) -> None:
    """Make the case usually target a served model with a small token budget (in place)."""
    targets = names * 3 + UNSERVED + [KEEP]  # mostly served; sometimes unserved or as generated
    if "model_id" in (case.path_parameters or {}):
        name = data.draw(st.sampled_from(targets), label="model_id")
        if name is not KEEP:
            case.path_parameters["model_id"] = name
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        name = data.draw(st.sampled_from(targets), label="model")
        if name is not KEEP:
            body["model"] = name
    for field in TOKEN_FIELDS:
        value = body.get(field)
        if type(value) is int and SMALL_BUDGET < value <= KEEP_BUDGET_ABOVE:
            body[field] = data.draw(st.integers(0, SMALL_BUDGET), label=field)
    if body.get("stream") in (None, False) and data.draw(st.sampled_from([False, True, False]),
                                                         label="stream"):
        body["stream"] = True  # generation rarely picks it; streams have their own code path
    if isinstance(body.get("messages"), list) and data.draw(st.sampled_from([True, True, False]),
                                                            label="drop unsupported chat features"):
        _neutral_chat(body, data)
    # chat without a budget runs up to the context: bound it on the one large-context model
    if ("messages" in body and body.get("model") == "slow"
            and not any(type(body.get(f)) is int for f in TOKEN_FIELDS)):
        body["max_completion_tokens"] = data.draw(st.integers(0, SMALL_BUDGET), label="budget")


def _neutral_chat(body: dict, data) -> None:
    """Drop the chat features the server answers with `unsupported_parameter`, so generation is reached
    (the optional fields removed keep a positive case positive)."""
    for field in CHAT_UNSUPPORTED:
        body.pop(field, None)
    for m in body["messages"]:
        if not isinstance(m, dict):
            continue
        for field in MESSAGE_UNSUPPORTED:
            m.pop(field, None)
        if m.get("role") in ("tool", "function"):
            m["role"] = data.draw(st.sampled_from(ROLES), label="role")
        if isinstance(m.get("content"), list):
            m["content"] = [{"type": "text", "text": p.get("text") if isinstance(p.get("text"), str) else ""}
                            if isinstance(p, dict) else p for p in m["content"]]
        elif m.get("content") is None and m.get("role") != "assistant":
            m["content"] = ""


def _sse_payloads(text: str) -> list[str]:
    payloads = []
    for line in text.splitlines():
        if not line or line.startswith(":"):
            continue
        if not line.startswith("data: "):
            raise AssertionError(f"not an SSE data line: {line!r}")
        payloads.append(line[len("data: "):])
    return payloads


def _check(method: str, path: str, response) -> list[tuple[str, str]]:
    """Problems with one response, as (kind, detail)."""
    status = response.status_code
    ctype = (response.headers.get("content-type") or [""])[0]
    text = response.content.decode("utf-8", errors="replace")
    if status >= 500:
        return [("5xx", f"status {status}")] + _error_shape(text)
    if status >= 400:
        return _error_shape(text)
    if not 200 <= status < 300:
        return [("unexpected status", f"status {status}")]
    whole, chunk = SUCCESS_ROOTS[(method, path)]
    if ctype.startswith("text/event-stream"):
        return _check_stream(text, chunk)
    try:
        validate(whole, _floats(json.loads(text)))
    except Exception as exc:  # noqa: BLE001 - any failure to parse or validate is the finding
        return [("2xx body not OpenAI's shape", f"{whole}: {type(exc).__name__}: {_short(str(exc), 300)}")]
    return []


def _floats(body: object) -> object:
    """An embedding list with base64 vectors decoded to floats (OpenAI's schema describes only floats)."""
    if isinstance(body, dict) and body.get("object") == "list":
        for item in body.get("data") or []:
            if isinstance(item, dict) and isinstance(item.get("embedding"), str):
                item["embedding"] = np.frombuffer(base64.b64decode(item["embedding"]), "<f4").tolist()
    return body


def _error_shape(text: str) -> list[tuple[str, str]]:
    try:
        validate("error", json.loads(text))
    except Exception as exc:  # noqa: BLE001
        return [("error body not OpenAI's shape", f"{type(exc).__name__}: {_short(str(exc), 300)}")]
    return []


def _check_stream(text: str, root: str | None) -> list[tuple[str, str]]:
    if root is None:
        return [("unexpected stream", "this endpoint does not stream")]
    try:
        payloads = _sse_payloads(text)
    except AssertionError as exc:
        return [("bad SSE framing", str(exc))]
    if not payloads or payloads[-1] != "[DONE]":
        return [("stream not ended by [DONE]", _short(payloads[-3:]))]
    problems = []
    for raw in payloads[:-1]:
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            problems.append(("stream payload not JSON", f"{exc}: {_short(raw)}"))
            continue
        if isinstance(obj, dict) and "error" in obj:
            problems += _error_shape(raw)
            if isinstance(obj["error"], dict) and obj["error"].get("type") == "server_error":
                problems.append(("in-stream server_error", _short(raw)))
            continue
        try:
            validate(root, obj)
        except Exception as exc:  # noqa: BLE001
            problems.append(("stream chunk not OpenAI's shape", f"{root}: {_short(str(exc), 300)}"))
    return problems


def _tracebacks(log: str) -> list[str]:
    blocks, lines = [], log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback") or "unhandled error" in line:
            blocks.append("\n".join(lines[max(0, i - 2):i + 40]))
    return blocks


def test_schemathesis_fuzz(server):
    config = schemathesis.Config.from_dict({"seed": 0, "max-stream-events": 1_000_000,
                                            "request-timeout": REQUEST_TIMEOUT})
    schema = schemathesis.openapi.from_url(server.base + "/openapi.json", config=config)
    ids = [m["id"] for m in httpx.get(server.url + "/models", timeout=10).json()["data"]]
    assert {"succ", "succ-tmpl", "rand", "slow"} <= set(ids)
    names = ids + ALIASES

    operations = {(m, p): schema[p][m] for m, p in {(m, p) for m, p, _, _ in PLAN}}
    counts: collections.Counter = collections.Counter()
    statuses: collections.Counter = collections.Counter()
    failures: list[Failure] = []
    session = requests.Session()
    log_start = len(server.logs())
    started = time.monotonic()

    def fuzz(method: str, path: str, mode: GenerationMode, examples: int) -> None:
        @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operations[(method, path)].as_strategy(mode), data=st.data())
        def run(case, data):
            _steer(case, data, names)
            counts[(method, path, mode.value)] += 1
            request = _short({"path": case.formatted_path, "query": case.query, "headers": case.headers,
                              "media_type": case.media_type, "body": case.body}, 600)
            try:
                response = case.call(base_url=server.base, session=session, timeout=REQUEST_TIMEOUT)
            except requests.RequestException as exc:
                failures.append(Failure("transport error (hang or dropped connection)", method, path,
                                        mode.value, request, None, "", f"{type(exc).__name__}: {exc}"))
                return
            statuses[(method, path, response.status_code)] += 1
            ctype = (response.headers.get("content-type") or [""])[0]
            if response.status_code == 200 and ctype.startswith("text/event-stream"):
                statuses[(method, path, "200 stream")] += 1
            for kind, detail in _check(method, path, response):
                failures.append(Failure(kind, method, path, mode.value, request, response.status_code,
                                        _short(response.content.decode("utf-8", "replace")), detail))

        run()

    for method, path, mode, examples in PLAN:
        fuzz(method, path, mode, examples)

    elapsed = time.monotonic() - started
    total = sum(counts.values())
    summary = (f"{total} requests in {elapsed:.1f}s; per operation: {dict(counts)}; "
               f"statuses: {dict(sorted(statuses.items(), key=str))}")
    print(summary)

    # the server survived and still answers a normal request
    assert server.proc.poll() is None, "the server process died during fuzzing"
    r = httpx.post(server.url + "/completions", json={"model": "succ", "prompt": "x", "max_tokens": 10},
                   timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "yz", r.text

    log = server.logs()[log_start:]
    for block in _tracebacks(log)[:3]:
        failures.append(Failure("server logged a traceback", "-", "-", "-", "-", None, "", block))

    assert total >= MIN_REQUESTS, summary
    # every operation and both generation modes were exercised, and generation was reached
    assert {(m, p, md.value) for m, p, md, _ in PLAN} <= set(counts), summary
    assert statuses[("POST", "/v1/completions", 200)] >= 50, summary
    assert statuses[("POST", "/v1/chat/completions", 200)] >= 50, summary

    if failures:
        groups: dict[tuple, list[Failure]] = collections.defaultdict(list)
        for f in failures:
            groups[f.key()].append(f)
        report = [f"{len(failures)} failing responses in {len(groups)} groups ({summary})"]
        for group in groups.values():
            report.append(f"--- {len(group)}x\n" + group[0].describe())
        pytest.fail("\n".join(report), pytrace=False)
