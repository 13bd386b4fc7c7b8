"""Tool calling (issue 11): tools, tool_choice and the legacy functions, enforced by constrained decoding, on
both engines with a random-weights model whose context holds the tool listing (the grammar guarantees the
shape of every call whatever the model)."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.conftest import serve_registry, with_engine
from tests.e2e.sse import stream
from tests.models import write_random
from tests.schemas import validate

REGISTRY = """
models:
  - id: rand
    path: {rand}
    prompt_template: plain
    workers: 1
"""
WEATHER = {"type": "object", "properties": {
    "city": {"enum": ["Paris", "Oslo", "Lima"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "note": {"type": "string", "maxLength": 4}},
    "required": ["city", "days"], "additionalProperties": False}
ROLL = {"type": "object", "properties": {"sides": {"enum": [6, 20]}}, "required": ["sides"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Forecast.", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "roll", "description": "Roll a die.", "parameters": ROLL}}]
PARAMS = {"weather": WEATHER, "roll": ROLL}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module", params=["ggml", "ctransformers"])
def tool_server(request, tmp_path_factory):
    """A server of each engine whose random model has room for the tools in its prompt."""
    d = tmp_path_factory.mktemp(f"tools-{request.param}")
    rand = write_random(d / "rand.bin", n_ctx=2048)
    yield from serve_registry(with_engine(REGISTRY, request.param).format(rand=rand), d)


@pytest.fixture()
def client(tool_server):
    with httpx.Client(base_url=tool_server.url, timeout=120) as c:
        yield c


def chat(client, **body) -> dict:
    r = client.post("/chat/completions", json={"model": "rand", "messages": USER, "max_tokens": 400} | body)
    assert r.status_code == 200, r.text
    validate("chat_completion", r.json())
    return r.json()


def calls_of(choice: dict) -> list[tuple[str, dict]]:
    """A choice's calls as (name, arguments), each validated against its tool's parameters."""
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and message["content"] is None, choice
    out = []
    for call in message["tool_calls"]:
        assert call["type"] == "function" and call["id"].startswith("call_")
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, PARAMS[call["function"]["name"]])
        out.append((call["function"]["name"], arguments))
    return out


@pytest.mark.parametrize("seed", [0, 5])
def test_required_gives_valid_calls_in_every_choice(client, seed):
    body = chat(client, tools=TOOLS, tool_choice="required", seed=seed, temperature=1.0, n=2)
    for choice in body["choices"]:
        assert 1 <= len(calls_of(choice)) <= 4


def test_a_named_function_is_the_only_one_called_and_parallel_false_gives_one_call(client):
    named = {"type": "function", "function": {"name": "roll"}}
    body = chat(client, tools=TOOLS, tool_choice=named, parallel_tool_calls=False, seed=2, temperature=1.0, n=2)
    for choice in body["choices"]:
        assert [name for name, _ in calls_of(choice)] == ["roll"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_gives_text_or_valid_calls(client, seed):
    body = chat(client, tools=TOOLS, seed=seed, temperature=1.0, max_tokens=24)
    choice = body["choices"][0]
    if choice["message"].get("tool_calls"):
        calls_of(choice)
    else:
        assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
        assert not choice["message"]["content"].startswith("<tool_call>")


def test_none_shows_no_tools_and_gives_text(client):
    plain = chat(client, seed=4, max_tokens=8)
    body = chat(client, tools=TOOLS, tool_choice="none", seed=4, max_tokens=8)
    assert body["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert body["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert "tool_calls" not in body["choices"][0]["message"]


def test_streamed_tool_call_deltas_assemble_into_the_non_streamed_calls(client):
    body = {"model": "rand", "messages": USER, "max_tokens": 400, "tools": TOOLS, "tool_choice": "required",
            "seed": 9, "temperature": 1.0, "n": 2}
    whole = chat(client, **{k: v for k, v in body.items() if k not in ("model", "messages")})
    chunks, _ = stream(client, "/chat/completions", body)
    assembled: dict[int, dict[int, dict]] = {0: {}, 1: {}}
    finish = {}
    for chunk in chunks:
        validate("chat_chunk", chunk)
        for ch in chunk["choices"]:
            assert not ch["delta"].get("content")
            for part in ch["delta"].get("tool_calls") or []:
                call = assembled[ch["index"]].setdefault(part["index"], {"name": "", "arguments": ""})
                if "id" in part:
                    assert part["type"] == "function" and part["function"]["name"]
                    call["id"] = part["id"]
                call["name"] += part["function"].get("name") or ""
                call["arguments"] += part["function"].get("arguments") or ""
            if ch["finish_reason"]:
                finish[ch["index"]] = ch["finish_reason"]
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    for choice in whole["choices"]:
        got = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(assembled[choice["index"]].items())]
        assert got == calls_of(choice)
        assert all(c["id"].startswith("call_") for c in assembled[choice["index"]].values())


def test_logprobs_cover_the_call_tokens(client):
    body = chat(client, tools=TOOLS, tool_choice="required", seed=1, logprobs=True, top_logprobs=2)
    choice = body["choices"][0]
    calls_of(choice)
    tokens = [t["token"] for t in choice["logprobs"]["content"]]
    assert "".join(tokens).startswith("<tool_call>[") and len(tokens) == body["usage"]["completion_tokens"]
    chunks, _ = stream(client, "/chat/completions", {"model": "rand", "messages": USER, "max_tokens": 400,
                                                     "tools": TOOLS, "tool_choice": "required", "seed": 1,
                                                     "logprobs": True, "top_logprobs": 2})
    for chunk in chunks:
        validate("chat_chunk", chunk)
    streamed = [t["token"] for c in chunks for ch in c["choices"] if ch.get("logprobs")
                for t in ch["logprobs"]["content"]]
    assert streamed == tokens


def test_a_length_cut_in_a_call_ends_with_length_and_the_raw_text(client):
    body = chat(client, tools=TOOLS, tool_choice="required", max_tokens=4, seed=0)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    assert "<tool_call>".startswith(choice["message"]["content"]) or choice["message"]["content"].startswith("<")
    chunks, _ = stream(client, "/chat/completions", {"model": "rand", "messages": USER, "tools": TOOLS,
                                                     "tool_choice": "required", "max_tokens": 4, "seed": 0})
    for chunk in chunks:
        validate("chat_chunk", chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == choice["message"]["content"] and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_history_with_calls_and_results_is_served(client):
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "roll", "arguments": '{"sides": 6}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "4"}]
    body = chat(client, messages=history, tools=TOOLS, tool_choice="required", seed=1, temperature=1.0)
    calls_of(body["choices"][0])
    longer = chat(client, messages=history, max_tokens=4, seed=1)
    assert longer["usage"]["prompt_tokens"] > chat(client, max_tokens=4, seed=1)["usage"]["prompt_tokens"]


@pytest.mark.parametrize("answer,why", [
    ({"role": "tool", "tool_call_id": "call_zz", "content": "4"}, "answers no tool call"),
    ({"role": "tool", "content": "4"}, "is required"),
])
def test_a_tool_result_must_answer_an_earlier_call(client, answer, why):
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "roll", "arguments": '{"sides": 6}'}}]},
        answer]
    r = client.post("/chat/completions", json={"model": "rand", "messages": history, "max_tokens": 4})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[2].tool_call_id" and why in err["message"]


def test_definitions_and_pointers_in_parameters_resolve_and_non_objects_are_a_400(client):
    params = {"type": "object", "properties": {"a": {"$ref": "#/definitions/A"}, "b": {"$ref": "#/properties/a"}},
              "required": ["a", "b"], "additionalProperties": False,
              "definitions": {"A": {"type": "integer", "minimum": 0, "maximum": 9}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    body = chat(client, tools=tools, tool_choice="required", seed=1, temperature=1.0, max_tokens=60)
    message = body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "tool_calls", body
    jsonschema.validate(json.loads(message["tool_calls"][0]["function"]["arguments"]), params)
    for parameters in ({"type": "string"}, {"type": "object", "properties": {
            f"p{i}": {"type": "integer"} for i in range(600)}}):
        tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
        r = client.post("/chat/completions", json={"model": "rand", "messages": USER, "tools": tools,
                                                   "tool_choice": "required", "max_tokens": 30})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "tools[0].function.parameters"


def test_deeply_nested_history_arguments_are_a_400(client):
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[" * 100_000 + "]" * 100_000}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    r = client.post("/chat/completions", json={"model": "rand", "messages": history, "max_tokens": 4})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[1].tool_calls[0].function.arguments"


def test_legacy_functions_reply_with_function_call(client):
    functions = [t["function"] for t in TOOLS]
    body = chat(client, functions=functions, function_call={"name": "weather"}, seed=3, temperature=1.0)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "function_call" and choice["message"]["content"] is None
    call = choice["message"]["function_call"]
    assert call["name"] == "weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER)
    chunks, _ = stream(client, "/chat/completions", {"model": "rand", "messages": USER, "max_tokens": 400,
                                                     "functions": functions, "function_call": {"name": "weather"},
                                                     "seed": 3, "temperature": 1.0})
    name = "".join(c["choices"][0]["delta"].get("function_call", {}).get("name") or "" for c in chunks if c["choices"])
    args = "".join(c["choices"][0]["delta"].get("function_call", {}).get("arguments") or ""
                   for c in chunks if c["choices"])
    for chunk in chunks:
        validate("chat_chunk", chunk)
    assert (name, args) == (call["name"], call["arguments"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call"


def test_the_openai_sdk_reads_the_tool_calls(tool_server):
    sdk = openai.OpenAI(base_url=tool_server.url, api_key="unused", max_retries=0)
    r = sdk.chat.completions.create(model="rand", messages=USER, tools=TOOLS, tool_choice="required",
                                    max_tokens=400, seed=6)
    call = r.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


class Pet(BaseModel):
    """A pet."""

    name: str = Field(max_length=5)
    age: int = Field(ge=0, le=30)


def test_langchain_bind_tools_round_trip_and_function_calling_structured_output(tool_server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def roll(sides: Literal[6, 20]) -> int:
        """Roll a die."""
        return min(sides, 3)

    llm = ChatOpenAI(model="rand", base_url=tool_server.url, api_key="unused", max_retries=0, max_tokens=200,
                     temperature=1.0, seed=2)
    # strict: the schema gets additionalProperties false, so a random model cannot invent a key until max_tokens
    bound = llm.bind_tools([roll], tool_choice="roll", strict=True)
    question = HumanMessage("roll")
    ai = bound.invoke([question])
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "roll"
    assert isinstance(ai.tool_calls[0]["args"], dict)
    result = roll.invoke(ai.tool_calls[0])
    assert isinstance(result, ToolMessage)
    after = llm.bind_tools([roll], tool_choice="none").bind(max_tokens=8).invoke([question, ai, result])
    assert isinstance(after.content, str) and not after.tool_calls
    pet = llm.with_structured_output(Pet, method="function_calling", strict=True).invoke("a pet")
    assert isinstance(pet, Pet)
