"""The Responses API's structured outputs (text.format json_schema) and function tools, through the OpenAI SDK
and LangChain's ChatOpenAI(use_responses_api=True): round trips, streamed calls, schema-valid arguments."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.e2e.test_responses import client, create, events, responses_server, sdk  # noqa: F401 (fixtures)
from tests.schemas import BOUNDED_OBJECT, validate

ROLL = {"type": "object", "properties": {"sides": {"enum": [6, 20]}}, "required": ["sides"],
        "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
           "additionalProperties": False}
TOOLS = [{"type": "function", "name": "roll", "description": "Roll a die.", "parameters": ROLL, "strict": True},
         {"type": "function", "name": "weather", "description": "Forecast.", "parameters": WEATHER, "strict": True}]
PARAMS = {"roll": ROLL, "weather": WEATHER}


def calls_of(body: dict) -> list[dict]:
    calls = [item for item in body["output"] if item["type"] == "function_call"]
    for call in calls:
        assert call["id"].startswith("fc_") and call["call_id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), PARAMS[call["name"]])
    return calls


def test_json_schema_output_is_valid(sdk):
    resp = sdk.responses.create(model="rand", input="A record, please.", max_output_tokens=300, text={
        "format": {"type": "json_schema", "name": "record", "schema": BOUNDED_OBJECT, "strict": True}})
    assert resp.status == "completed" and resp.text.format.type == "json_schema"
    jsonschema.validate(json.loads(resp.output_text), BOUNDED_OBJECT)


def test_json_object_output_is_an_object(client):
    body = create(client, model="rand", max_output_tokens=300, text={"format": {"type": "json_object"}})
    if body["status"] == "completed":  # random weights may write a long object: only a whole one parses
        assert isinstance(json.loads(body["output"][0]["content"][0]["text"]), dict)


def test_function_tool_round_trip(client):
    first = create(client, model="rand", input="Roll a die.", tools=TOOLS, tool_choice="required",
                   max_output_tokens=200)
    calls = calls_of(first)
    assert calls and first["tools"][0]["name"] == "roll" and first["tool_choice"] == "required"
    outputs = [{"type": "function_call_output", "call_id": c["call_id"], "output": "4"} for c in calls]
    answer = create(client, model="rand", previous_response_id=first["id"], input=outputs, tools=TOOLS,
                    tool_choice="none", max_output_tokens=16)
    assert answer["output"][0]["type"] == "message" and not calls_of(answer)
    # the same conversation sent whole (no previous_response_id): the same prompt
    whole = create(client, model="rand", input=[{"role": "user", "content": "Roll a die."}, *calls, *outputs],
                   tools=TOOLS, tool_choice="none", max_output_tokens=16, store=False)
    assert whole["usage"]["input_tokens"] == answer["usage"]["input_tokens"]


def test_a_named_function_and_parallel_false(client):
    body = create(client, model="rand", tools=TOOLS, tool_choice={"type": "function", "name": "weather"},
                  parallel_tool_calls=False, max_output_tokens=200)
    calls = calls_of(body)
    assert [c["name"] for c in calls] == ["weather"] and body["parallel_tool_calls"] is False


def test_streamed_calls_have_argument_events(client):
    evs = events(client, model="rand", tools=TOOLS, tool_choice="required", max_output_tokens=200)
    final = evs[-1]["response"]
    assert evs[-1]["type"] == "response.completed"
    calls = calls_of(final)
    for index, call in enumerate(calls):
        added = [e for e in evs if e["type"] == "response.output_item.added" and e["output_index"] == index]
        assert added[0]["item"]["call_id"] == call["call_id"] and added[0]["item"]["arguments"] == ""
        deltas = [e["delta"] for e in evs if e["type"] == "response.function_call_arguments.delta"
                  and e["item_id"] == call["id"]]
        done = [e for e in evs if e["type"] == "response.function_call_arguments.done" and e["item_id"] == call["id"]]
        assert "".join(deltas) == done[0]["arguments"] == call["arguments"] and done[0]["name"] == call["name"]
    assert not any(e["type"].startswith("response.output_text") for e in evs)


def test_sdk_reads_function_calls(sdk):
    resp = sdk.responses.create(model="rand", input="Weather?", tools=TOOLS, tool_choice="required",
                                max_output_tokens=200)
    calls = [o for o in resp.output if o.type == "function_call"]
    assert calls and all(c.name in PARAMS for c in calls)
    follow = sdk.responses.create(model="rand", previous_response_id=resp.id, tools=TOOLS, tool_choice="none",
                                  max_output_tokens=16, input=[
                                      {"type": "function_call_output", "call_id": c.call_id, "output": "sunny"}
                                      for c in calls])
    assert follow.output[0].type == "message"


def test_langchain_responses_api_invoke_stream_and_tools(responses_server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="succ", base_url=responses_server.url, api_key="unused", max_retries=0,
                     use_responses_api=True, max_tokens=32)
    reply = llm.invoke("hello")
    assert reply.text and reply.usage_metadata["output_tokens"] > 0
    chunks = list(llm.stream("hello"))
    assert "".join(c.text for c in chunks) == reply.text

    @tool
    def roll(sides: int) -> str:
        """Roll a die with this many sides."""
        return "4"

    rand = ChatOpenAI(model="rand", base_url=responses_server.url, api_key="unused", max_retries=0,
                      use_responses_api=True, max_tokens=200)
    question = HumanMessage("Roll a d6.")
    ai = rand.bind_tools([roll], tool_choice="roll", strict=True).invoke([question])  # strict: a bounded call
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "roll"
    results = [ToolMessage("4", tool_call_id=c["id"]) for c in ai.tool_calls]
    after = rand.bind_tools([roll], tool_choice="none").bind(max_tokens=16).invoke([question, ai, *results])
    assert isinstance(after.text, str) and not after.tool_calls


def test_langchain_chained_with_previous_response_id(responses_server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="succ", base_url=responses_server.url, api_key="unused", max_retries=0,
                     use_responses_api=True, use_previous_response_id=True, max_tokens=32)
    first = llm.invoke("hello")
    second = llm.invoke(["hello", first, "and more?"])
    assert second.text and second.response_metadata["id"].startswith("resp_")


@pytest.mark.parametrize("stream", [False, True])
def test_built_in_tools_are_refused_by_the_sdk_too(sdk, stream):
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.responses.create(model="succ", input="hi", tools=[{"type": "web_search"}], stream=stream)
    assert exc.value.param == "tools[0].type"
    validate("error", exc.value.body if "error" in exc.value.body else {"error": exc.value.body})


def test_sdk_parse_and_langchain_structured_output_give_pydantic_objects(sdk, responses_server):
    from typing import Literal

    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        kind: Literal["cat", "dog"]
        age: int = Field(ge=0, le=30)

    parsed = sdk.responses.parse(model="rand", input="A pet, please.", text_format=Pet, max_output_tokens=64)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Pet)
    llm = ChatOpenAI(model="rand", base_url=responses_server.url, api_key="unused", max_retries=0,
                     use_responses_api=True, max_tokens=64)
    for method in ("json_schema", "function_calling"):
        pet = llm.with_structured_output(Pet, method=method, strict=True).invoke("A pet, please.")
        assert isinstance(pet, Pet), method
