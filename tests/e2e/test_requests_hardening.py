"""Requests over real HTTP: inputs that used to give a 500 (and close keep-alive), huge prompts refused
cheaply while /health answers, models that are registered but not servable, and the OpenAPI description.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.schemas import validate

JSON_CT = {"content-type": "application/json"}
GOOD = b'{"model": "succ", "prompt": "x", "max_tokens": 4}'


def connect(server) -> http.client.HTTPConnection:
    url = urlsplit(server.base)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=60)


def post_on(conn: http.client.HTTPConnection, path: str, raw: bytes, headers: dict | None = None):
    conn.request("POST", "/v1" + path, body=raw, headers={**JSON_CT, **(headers or {})})
    response = conn.getresponse()
    return response, response.read()


# ---- item 10: these gave a 500 and closed the connection ----
KEY_4301 = "1" * 4301
SURROGATE_CASES = [
    ("logit_bias-key-4301-digits", "/completions",
     b'{"model": "succ", "prompt": "x", "max_tokens": 4, "logit_bias": {"' + KEY_4301.encode() + b'": 1}}',
     400, "logit_bias"),
    ("logit_bias-key-4301-digits", "/chat/completions",
     b'{"model": "succ", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"'
     + KEY_4301.encode() + b'": 1}}', 400, "logit_bias"),
    ("model-lone-surrogate", "/completions", b'{"model": "\\ud800", "prompt": "x"}', 404, "model"),
    ("model-lone-surrogate", "/chat/completions",
     b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
    ("content-part-type-lone-surrogate", "/chat/completions",
     b'{"model": "succ", "messages": [{"role": "user", "content": [{"type": "\\ud800"}]}]}', 400, "messages"),
    ("unknown-field-lone-surrogate", "/completions", b'{"model": "succ", "prompt": "x", "\\udfff": 1}', 400, None),
]


@pytest.mark.parametrize("case", SURROGATE_CASES, ids=[f"{c[1]} {c[0]}" for c in SURROGATE_CASES])
def test_inputs_that_gave_a_500_are_4xx_and_keep_the_connection(server, case):
    _, path, raw, status, param = case
    conn = connect(server)
    try:
        response, body = post_on(conn, path, raw)
        assert response.status == status, body[:500]
        error = json.loads(body)["error"]
        validate("error", {"error": error})
        if param is not None:
            assert error["param"] is not None and error["param"].startswith(param), error
        assert not response.will_close, "the server closed the keep-alive connection"
        sock = conn.sock
        again, body = post_on(conn, "/completions", GOOD)
        assert again.status == 200 and json.loads(body)["choices"][0]["text"] == "yz"
        assert conn.sock is sock, "the second request needed a new connection"
    finally:
        conn.close()


def test_a_lone_surrogate_model_name_is_shown_as_text(server):
    r = httpx.post(server.url + "/completions", content=b'{"model": "a\\ud800b", "prompt": "x"}',
                   headers=JSON_CT, timeout=30)
    assert r.status_code == 404 and "a\\ud800b" in r.json()["error"]["message"]


# ---- item 10: no string in any field reaches a 5xx ----
NASTY = st.one_of(
    st.text(st.characters(categories=["Cs", "Cc"]), min_size=1, max_size=6),  # lone surrogates, controls
    st.text(st.characters(codec=None), max_size=12).map(lambda s: s + "\ud800"),
    st.integers(4290, 4400).map(lambda k: "9" * k),  # beyond int()'s digit limit
    st.sampled_from(["", "\x00", "\ud83d\ude00", "\udfff\ud800", "text", "-1", "1e400", "NaN"]),
)
USER = {"role": "user", "content": "hi"}
# where a string goes: a function from the string to a request body
COMPLETION_SLOTS = {
    "model": lambda s: {"model": s, "prompt": "x"},
    "prompt": lambda s: {"prompt": s},
    "prompt-list": lambda s: {"prompt": ["x", s]},
    "stop": lambda s: {"prompt": "x", "stop": s},
    "stop-list": lambda s: {"prompt": "x", "stop": [s]},
    "user": lambda s: {"prompt": "x", "user": s},
    "suffix": lambda s: {"prompt": "x", "suffix": s},
    "logit_bias-key": lambda s: {"prompt": "x", "logit_bias": {s: 1}},
    "unknown-field": lambda s: {"prompt": "x", s: 1},
    "stream_options-key": lambda s: {"prompt": "x", "stream": True, "stream_options": {s: True}},
}
CHAT_SLOTS = {
    "model": lambda s: {"model": s, "messages": [USER]},
    "role": lambda s: {"messages": [{"role": s, "content": "hi"}]},
    "content": lambda s: {"messages": [{"role": "user", "content": s}]},
    "part-type": lambda s: {"messages": [{"role": "user", "content": [{"type": s}]}]},
    "part-text": lambda s: {"messages": [{"role": "user", "content": [{"type": "text", "text": s}]}]},
    "part-extra-key": lambda s: {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", s: 1}]}]},
    "name": lambda s: {"messages": [{"role": "user", "content": "hi", "name": s}]},
    "refusal": lambda s: {"messages": [{"role": "assistant", "content": "hi", "refusal": s}, USER]},
    "tool_call_id": lambda s: {"messages": [{"role": "user", "content": "hi", "tool_call_id": s}]},
    "message-key": lambda s: {"messages": [{"role": "user", "content": "hi", s: 1}]},
    "stop": lambda s: {"messages": [USER], "stop": [s]},
    "user": lambda s: {"messages": [USER], "user": s},
    "logit_bias-key": lambda s: {"messages": [USER], "logit_bias": {s: 1}},
    "reasoning_effort": lambda s: {"messages": [USER], "reasoning_effort": s},
    "verbosity": lambda s: {"messages": [USER], "verbosity": s},
    "service_tier": lambda s: {"messages": [USER], "service_tier": s},
    "safety_identifier": lambda s: {"messages": [USER], "safety_identifier": s},
    "prompt_cache_key": lambda s: {"messages": [USER], "prompt_cache_key": s},
    "metadata-key": lambda s: {"messages": [USER], "metadata": {s: "v"}},
    "metadata-value": lambda s: {"messages": [USER], "metadata": {"k": s}},
    "response_format-type": lambda s: {"messages": [USER], "response_format": {"type": s}},
    "modalities": lambda s: {"messages": [USER], "modalities": [s]},
    "tool_choice": lambda s: {"messages": [USER], "tool_choice": s},
    "unknown-field": lambda s: {"messages": [USER], s: 1},
}
SLOTS = ([("/completions", name, fn) for name, fn in COMPLETION_SLOTS.items()]
         + [("/chat/completions", name, fn) for name, fn in CHAT_SLOTS.items()])


def check_answer(status: int, body: bytes, content_type: str) -> None:
    assert status < 500, body[:500]
    if content_type.startswith("text/event-stream"):
        payloads = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]"
        return
    parsed = json.loads(body)  # always valid JSON
    if status >= 400:
        validate("error", parsed)


def test_strings_with_surrogates_controls_or_huge_digits_in_any_field_never_give_a_5xx(server):
    conn = connect(server)
    start = len(server.logs())

    @settings(max_examples=300, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(slot=st.sampled_from(SLOTS), text=NASTY, stream=st.booleans())
    def send(slot, text, stream):
        path, _, fill = slot
        body = {"model": "succ", "max_tokens": 4, "stream": stream, **fill(text)}
        conn.request("POST", "/v1" + path, body=json.dumps(body).encode(), headers=JSON_CT)
        response = conn.getresponse()
        check_answer(response.status, response.read(), response.getheader("content-type", ""))
        assert not response.will_close, "the server closed the keep-alive connection"

    try:
        send()
    finally:
        conn.close()
    log = server.logs()[start:]
    assert "Traceback" not in log and "Logging error" not in log, log[-3000:]


# ---- item 3: what cannot fit is refused cheaply, and /health keeps answering ----
def huge_requests() -> list[tuple[str, bytes]]:
    word = "a" * 4_000_000  # one 4 MB word (the body limit is 4 MiB)
    ids = b"[" + b",".join([b"1"] * 2_000_000) + b"]"
    return [
        *[("/completions", json.dumps({"model": "succ", "prompt": word, "max_tokens": 4}).encode())] * 3,
        *[("/chat/completions", json.dumps({"model": "succ", "messages": [{"role": "user", "content": word}]})
           .encode())] * 2,
        *[("/completions", b'{"model": "succ", "max_tokens": 4, "prompt": ' + ids + b"}")] * 2,
    ]


def test_huge_prompts_are_refused_by_size_while_health_answers(server):
    requests = huge_requests()
    results: list[tuple[int, dict]] = []

    def send(path: str, raw: bytes) -> None:
        r = httpx.post(server.url + path, content=raw, headers=JSON_CT, timeout=120)
        results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=send, args=req) for req in requests]
    started = time.monotonic()
    for t in threads:
        t.start()
    slowest = 0.0
    while any(t.is_alive() for t in threads):
        t0 = time.monotonic()
        assert httpx.get(server.base + "/health", timeout=30).status_code == 200
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    for t in threads:
        t.join()
    assert len(results) == len(requests)
    for status, body in results:
        assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    # generous bounds: before, each 4 MB word took ~10 s of CPU to tokenize (7 at once: over a minute)
    assert elapsed < 30, f"the huge requests took {elapsed:.1f}s"
    assert slowest < 10, f"/health took {slowest:.1f}s while they were refused"


# ---- item 20: registered models that are not served ----
def test_a_registered_model_without_its_file_says_how_to_download_it(server):
    rid = uuid.uuid4().hex
    r = httpx.post(server.url + "/chat/completions", json={"model": "absent", "messages": [USER]},
                   headers={"x-request-id": rid}, timeout=30)
    assert r.status_code == 404
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert "not downloaded" in error["message"] and "gpt4all-j-server pull absent" in error["message"]
    r = httpx.get(server.url + "/models/absent", timeout=30)
    assert r.status_code == 404 and "gpt4all-j-server pull absent" in r.json()["error"]["message"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in server.logs().splitlines() if rid in line]
        if lines:
            break
        time.sleep(0.1)
    assert lines and "model=absent" in lines[0], lines


# ---- item 18: the OpenAPI description ----
def test_openapi_lists_the_real_errors_and_the_event_stream(server):
    doc = httpx.get(server.base + "/openapi.json", timeout=30).json()
    text = json.dumps(doc)
    assert '"422"' not in text and "HTTPValidationError" not in text
    error_ref = "#/components/schemas/ErrorResponse"
    assert set(doc["components"]["schemas"]["Error"]["required"]) == {"message", "type", "param", "code"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        for status in ("400", "401", "404", "413", "503"):
            assert responses[status]["content"]["application/json"]["schema"]["$ref"] == error_ref, status
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    for path, statuses in (("/v1/models", ("401",)), ("/v1/models/{model_id}", ("401", "404", "503"))):
        responses = doc["paths"][path]["get"]["responses"]
        for status in statuses:
            assert responses[status]["content"]["application/json"]["schema"]["$ref"] == error_ref
