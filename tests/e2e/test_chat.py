"""POST /v1/chat/completions over raw HTTP, checked against OpenAI's schemas."""

import httpx
import pytest

from tests.e2e.sse import stream
from tests.schemas import usage_counts, validate


@pytest.fixture()
def client(engine_server):
    """A client of the session server of each engine: these tests run on both."""
    with httpx.Client(base_url=engine_server.url, timeout=60) as c:
        yield c

USER = [{"role": "user", "content": "hello"}]


def chat(client, **body):
    r = client.post("/chat/completions", json={"model": "succ", "messages": USER, **body})
    assert r.status_code == 200, r.text
    validate("chat_completion", r.json())
    return r.json()


def test_reply_usage_and_shape(client):
    body = chat(client)
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hi there!", "refusal": None}
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    # "hello\n" is six single-byte tokens in the plain template
    assert usage_counts(body["usage"]) == (6, 3, 9)


def test_template_system_prompt_and_history(client):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"},
            {"role": "user", "content": [{"type": "text", "text": "s"}]}]
    body = chat(client, model="succ-tmpl", messages=msgs)
    rendered = "<s>sys</s><u>q</u><a>r</a><u>s</u>\n"
    assert body["usage"]["prompt_tokens"] == len(rendered.encode())
    assert body["choices"][0]["message"]["content"] == "Hi there!"
    explicit = chat(client, model="succ-tmpl", messages=[{"role": "developer", "content": "d"}, *msgs])
    assert explicit["usage"]["prompt_tokens"] == len(rendered.replace("sys", "d").encode())


def test_max_completion_tokens_and_stop(client):
    body = chat(client, max_completion_tokens=2)
    assert body["choices"][0]["message"]["content"] == "Hi there"
    assert body["choices"][0]["finish_reason"] == "length"
    body = chat(client, max_tokens=2)
    assert body["choices"][0]["message"]["content"] == "Hi there"
    body = chat(client, stop=[" th"])
    assert body["choices"][0]["message"]["content"] == "Hi"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_stream_role_first_then_deltas_then_finish(client):
    chunks, _ = stream(client, "/chat/completions", {"model": "succ", "messages": USER})
    for c in chunks:
        validate("chat_chunk", c)
        assert c["object"] == "chat.completion.chunk" and "usage" not in c
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hi there!"
    assert len({c["id"] for c in chunks}) == 1


def test_stream_include_usage(client):
    chunks, _ = stream(client, "/chat/completions", {"model": "succ", "messages": USER,
                                                     "stream_options": {"include_usage": True}})
    for c in chunks:
        validate("chat_chunk", c)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert usage_counts(chunks[-1]["usage"]) == (6, 3, 9)


def test_n_and_logprobs(client):
    body = chat(client, n=2, logprobs=True, top_logprobs=2)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    content = body["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in content] == ["Hi", " there", "!"]
    assert content[0]["bytes"] == list(b"Hi") and len(content[0]["top_logprobs"]) == 2
    assert body["choices"][0]["logprobs"]["refusal"] is None
    assert body["usage"]["completion_tokens"] == 6 and body["usage"]["prompt_tokens"] == 6
    chunks, _ = stream(client, "/chat/completions", {"model": "succ", "messages": USER, "logprobs": True})
    for c in chunks:
        validate("chat_chunk", c)
    tokens = [t["token"] for c in chunks for ch in c["choices"] if ch.get("logprobs")
              for t in ch["logprobs"]["content"]]
    assert tokens == ["Hi", " there", "!"]


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"store": True}, "store"),
])
def test_unsupported_or_invalid_is_400(client, body, param):
    r = client.post("/chat/completions", json={"model": "succ", "messages": USER, **body})
    assert r.status_code == 400, r.text
    validate("error", r.json())
    assert r.json()["error"]["param"] == param


def test_unknown_and_unserved_models_are_404(client):
    for name in ("nope", "absent"):
        r = client.post("/chat/completions", json={"model": name, "messages": USER})
        assert r.status_code == 404
        validate("error", r.json())
        assert r.json()["error"]["code"] == "model_not_found"
        assert client.get(f"/models/{name}").status_code == 404
    r = client.get("/models/succ-alias")
    assert r.status_code == 200 and r.json()["id"] == "succ"
    validate("model", r.json())
    validate("model_list", client.get("/models").json())


def test_http_level_errors_use_the_openai_body(client, server):
    import httpx

    cases = [
        client.post("/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
        client.post("/chat/completions", json={"model": 5, "messages": USER}),
        client.post("/chat/completions"),
        client.get("/nowhere"),
        client.get("/chat/completions"),
        httpx.get(server.base + "/v2/unknown"),
    ]
    assert [r.status_code for r in cases] == [400, 400, 400, 404, 405, 404]
    for r in cases:
        validate("error", r.json())
    assert cases[0].json()["error"]["code"] == "invalid_json"


def test_context_length_exceeded_blames_messages(client):
    long = [{"role": "user", "content": " ".join(["a"] * 200)}]
    for stream in (False, True):
        r = client.post("/chat/completions", json={"model": "rand", "messages": long, "stream": stream})
        assert r.status_code == 400, r.text
        validate("error", r.json())
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert r.json()["error"]["param"] == "messages"


def test_prefix_cache_reports_cached_tokens_and_routes_follow_ups(model_files, tmp_path):
    """Two workers: a conversation's next turn goes to the worker holding its prefix, even after an
    unrelated request in between; with prefix_cache off nothing is reused."""
    import httpx

    from tests.e2e.conftest import start_server, stop_server

    registry = tmp_path / "registry.yaml"
    registry.write_text(
        f"models:\n"
        f"  - {{id: cache-on, path: {model_files['rand']}, prompt_template: plain, workers: 2}}\n"
        f"  - {{id: cache-off, path: {model_files['rand']}, prompt_template: plain, prefix_cache: false}}\n")
    srv = start_server(registry, tmp_path / "server.log")
    try:
        def turn(model: str, messages: list[dict]) -> tuple[str, dict]:
            r = httpx.post(srv.url + "/chat/completions", timeout=30, json={
                "model": model, "messages": messages, "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            validate("chat_completion", r.json())
            return r.json()["choices"][0]["message"]["content"], r.json()["usage"]

        history = [{"role": "user", "content": "Tell me a story about a cat and a dog."}]
        reply, first = turn("cache-on", history)
        assert first["prompt_tokens_details"]["cached_tokens"] == 0
        turn("cache-on", [{"role": "user", "content": "Something unrelated entirely, please."}])
        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
        _, second = turn("cache-on", history)
        assert second["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"] - 1
        turn("cache-off", history[:1])
        _, off = turn("cache-off", history)
        assert off["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        stop_server(srv)
