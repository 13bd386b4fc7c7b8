"""The Responses API (issue 12 §3) through the real server: the OpenAI SDK's responses.create (plain, streamed,
the stream helper, chained), retrieve / delete / input_items, the 400s naming each unsupported field; every
object, event and request validated against OpenAI's own schemas."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.e2e.conftest import serve_registry
from tests.models import write_random, write_successor
from tests.schemas import validate

REGISTRY = """
models:
  - id: succ
    path: {succ}
    prompt_template: plain
    sampling: {{temperature: 0}}
    workers: 1
  - id: rand
    path: {rand}
    prompt_template: plain
    workers: 1
"""


@pytest.fixture(scope="module")
def responses_server(tmp_path_factory):
    """The successor model (deterministic) and a random one with room for tool listings; its own data folder."""
    d = tmp_path_factory.mktemp("responses")
    text = REGISTRY.format(succ=write_successor(d / "succ.bin"), rand=write_random(d / "rand.bin", n_ctx=2048))
    yield from serve_registry(text, d, {"GPT4ALL_J_DATA_DIR": str(d / "data")})


@pytest.fixture()
def sdk(responses_server):
    return openai.OpenAI(base_url=responses_server.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def client(responses_server):
    with httpx.Client(base_url=responses_server.url, timeout=60) as c:
        yield c


def create(client: httpx.Client, **body) -> dict:
    """POST /responses (the request itself validated as OpenAI's CreateResponse), a 200 validated as Response."""
    body = {"model": "succ", "input": "hello"} | body
    validate("response_request", body)
    r = client.post("/responses", json=body)
    assert r.status_code == 200, r.text
    validate("response", r.json())
    return r.json()


def events(client: httpx.Client, **body) -> list[dict]:
    """A streamed response's events: `event:` matches each data's type, sequence numbers count up from 0,
    every event is valid against OpenAI's ResponseStreamEvent, and the stream ends with data: [DONE]."""
    body = {"model": "succ", "input": "hello", "stream": True} | body
    validate("response_request", body)
    out, kind = [], None
    with client.stream("POST", "/responses", json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        if line.startswith("event: "):
            kind = line[len("event: "):]
            continue
        data = json.loads(line[len("data: "):])
        assert data["type"] == kind
        validate("response_stream_event", data)
        out.append(data)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def test_sdk_create_gives_a_valid_response_with_real_usage(sdk, client):
    resp = sdk.responses.create(model="succ", input="hello", instructions="Be brief.", max_output_tokens=32,
                                metadata={"k": "v"}, temperature=0, top_p=0.5)
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.status == "completed"
    assert resp.output_text and resp.output[0].id.startswith("msg_")
    assert resp.instructions == "Be brief." and resp.metadata == {"k": "v"} and resp.max_output_tokens == 32
    assert resp.temperature == 0 and resp.top_p == 0.5
    use = resp.usage
    assert use.input_tokens > 0 and use.output_tokens > 0
    assert use.total_tokens == use.input_tokens + use.output_tokens
    assert use.output_tokens_details.reasoning_tokens == 0
    # the same through the chat service: the same text and token counts (it is the same work)
    chat = client.post("/chat/completions", json={
        "model": "succ", "max_tokens": 32, "temperature": 0, "top_p": 0.5,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]}).json()
    assert chat["choices"][0]["message"]["content"] == resp.output_text
    assert chat["usage"]["prompt_tokens"] == use.input_tokens
    assert chat["usage"]["completion_tokens"] == use.output_tokens


def test_both_engines(engine_server):
    """The session servers of each engine (store: false, so their data folder gets no file)."""
    sdk = openai.OpenAI(base_url=engine_server.url, api_key="unused", max_retries=0, timeout=60)
    whole = sdk.responses.create(model="succ", input="hello", max_output_tokens=16, store=False)
    streamed = list(sdk.responses.create(model="succ", input="hello", max_output_tokens=16, store=False,
                                         stream=True))
    assert whole.output_text and streamed[-1].response.output_text == whole.output_text
    assert streamed[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_max_output_tokens_cut_is_incomplete(client):
    body = create(client, model="rand", max_output_tokens=16)  # random weights: an end token is unlikely
    assert body["status"] == "incomplete", body
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["usage"]["output_tokens"] == 16 and body["output"][0]["status"] == "incomplete"


def test_max_output_tokens_below_16_is_a_400_as_openai(client):
    r = client.post("/responses", json={"model": "succ", "input": "hi", "max_output_tokens": 8})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens"


def test_a_streamed_cut_ends_with_response_incomplete(client):
    evs = events(client, model="rand", max_output_tokens=16)
    assert evs[-1]["type"] == "response.incomplete"
    final = evs[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["usage"]["output_tokens"] == 16


def test_streamed_events_are_typed_ordered_and_assemble_the_response(client):
    whole = create(client, store=False)
    evs = events(client, store=False)
    kinds = [e["type"] for e in evs]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    deltas = [e for e in evs if e["type"] == "response.output_text.delta"]
    item_id = evs[2]["item"]["id"]
    assert deltas and all(d["item_id"] == item_id and d["output_index"] == 0 and d["content_index"] == 0
                          for d in deltas)
    text = "".join(d["delta"] for d in deltas)
    final = evs[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == text == whole["output"][0]["content"][0]["text"]
    assert final["output"][0]["id"] == item_id and final["usage"]["output_tokens"] == whole["usage"]["output_tokens"]
    assert {e["response"]["id"] for e in evs if "response" in e} == {final["id"]}


def test_sdk_stream_and_the_stream_helper(sdk):
    streamed = list(sdk.responses.create(model="succ", input="hello", stream=True))
    assert streamed[-1].type == "response.completed"
    text = "".join(e.delta for e in streamed if e.type == "response.output_text.delta")
    with sdk.responses.stream(model="succ", input="hello") as stream:
        helper_text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == helper_text == final.output_text and final.status == "completed"


def test_chained_responses_replay_the_conversation(sdk):
    first = sdk.responses.create(model="succ", input="hello", instructions="Be brief.")
    second = sdk.responses.create(model="succ", input="and more?", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.instructions is None
    # the second prompt holds the first turn (question and answer; not its instructions) and the new input
    alone = sdk.responses.create(model="succ", input=[
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "and more?"}], store=False)
    assert second.usage.input_tokens == alone.usage.input_tokens and second.output_text == alone.output_text
    items = sdk.responses.input_items.list(second.id, order="asc").data
    assert [(i.type, i.role) for i in items] == [("message", "user"), ("message", "assistant"),
                                                  ("message", "user")]
    assert items[1].content[0].text == first.output_text and items[2].content[0].text == "and more?"
    bad = httpx.get(f"{sdk.base_url}responses/{second.id}/input_items", params={"limit": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"  # a query parameter, by its name
    newest = sdk.responses.input_items.list(second.id, limit=1)
    assert [i.id for i in newest.data] == [items[2].id] and newest.has_more


def test_retrieve_delete_and_store_false(sdk, client):
    made = sdk.responses.create(model="succ", input="hello")
    got = client.get(f"/responses/{made.id}")
    assert got.status_code == 200
    validate("response", got.json())
    assert got.json()["output"][0]["content"][0]["text"] == made.output_text
    assert sdk.responses.retrieve(made.id).id == made.id
    replay = client.get(f"/responses/{made.id}", params={"stream": "true"})
    assert replay.status_code == 400 and replay.json()["error"]["param"] == "stream"
    r = client.delete(f"/responses/{made.id}")
    assert r.status_code == 200 and r.json() == {"id": made.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(made.id)
    gone = client.delete(f"/responses/{made.id}")
    assert gone.status_code == 404
    validate("error", gone.json())
    unstored = sdk.responses.create(model="succ", input="hello", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.responses.create(model="succ", input="more", previous_response_id=unstored.id)
    assert exc.value.code == "previous_response_not_found" and exc.value.param == "previous_response_id"


@pytest.mark.parametrize(("body", "param"), [
    ({"frobnicate": 1}, "frobnicate"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True},
                {"type": "file_search", "vector_store_ids": ["x"]}]}, "tools[1].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"},
                                             {"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[1].type"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": "hi", "colour": "red"}]}, "input[0].colour"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"background": True}, "background"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, "tool_choice"),
    ({"text": {"verbosity": "high"}}, "text.verbosity"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"max_output_tokens": 100_000}, "max_output_tokens"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "minProperties": "z"}}}},
     "text.format.schema"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}, "strict": True}]},
     "tools[0].parameters"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{not json"}]},
     "input[0].arguments"),
    ({"input": "x " * 5000}, "input"),
])
def test_unsupported_or_invalid_fields_are_a_400_naming_them(client, body, param):
    r = client.post("/responses", json={"model": "succ", "input": "hi"} | body)
    assert r.status_code == 400, r.text
    validate("error", r.json())
    assert r.json()["error"]["param"] == param, r.json()


def test_errors_before_the_stream_are_json(client):
    r = client.post("/responses", json={"model": "nope", "input": "hi", "stream": True})
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "model_not_found"
