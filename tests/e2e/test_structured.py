"""Structured outputs (issue 11): response_format json_object / json_schema, enforced by constrained decoding,
on both engines, with the random-weights model (the guarantee does not depend on the model)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.sse import stream
from tests.schemas import validate

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}},
        "required": ["name", "tags", "inner"], "additionalProperties": False},
    "enum_and_range": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 1, "maximum": 9},
        "x": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["color", "n"], "additionalProperties": False},
    "pattern_and_optional": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
        "note": {"type": "string", "maxLength": 3}},
        "required": ["code"], "additionalProperties": False},
    "array_root": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                   "minItems": 1, "maxItems": 3},
}


def chat(client, **body) -> dict:
    r = client.post("/chat/completions", json={"model": "rand", "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 80} | body)
    assert r.status_code == 200, r.text
    validate("chat_completion", r.json())
    return r.json()


def json_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture()
def client(engine_server):
    with httpx.Client(base_url=engine_server.url, timeout=60) as c:
        yield c


CLOSERS = {"34": 5, "125": 5}  # '"' and '}' of the test vocabulary: a random model then closes what it opens


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_object_mode_gives_a_json_object(client, seed):
    """Any object: its keys and strings are unbounded, so a random model left alone can write one string until
    max_tokens (finish_reason "length", as OpenAI's); a bias toward the closing characters (which the grammar
    allows only where they are valid JSON) makes it finish."""
    body = chat(client, response_format={"type": "json_object"}, temperature=1.0, seed=seed, logit_bias=CLOSERS)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_a_max_tokens_cut_ends_with_length_and_the_start_of_the_json(client):
    body = chat(client, response_format=json_format("nested", SCHEMAS["nested"]), max_tokens=3, seed=0)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith('{"'), choice


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("seed", [0, 7])
def test_every_output_validates_against_its_schema(client, name, seed):
    body = chat(client, response_format=json_format(name, SCHEMAS[name]), seed=seed, temperature=1.0, n=2)
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMAS[name])


def test_a_streamed_reply_is_the_same_json(client):
    fmt = json_format("nested", SCHEMAS["nested"])
    whole = chat(client, response_format=fmt, seed=3, temperature=1.0)["choices"][0]["message"]["content"]
    chunks, _ = stream(client, "/chat/completions", {
        "model": "rand", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 80,
        "response_format": fmt, "seed": 3, "temperature": 1.0})
    for chunk in chunks:
        validate("chat_chunk", chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole
    jsonschema.validate(json.loads(text), SCHEMAS["nested"])


class Pet(BaseModel):
    name: str = Field(max_length=5)
    age: int = Field(ge=0, le=30)


def test_the_openai_sdk_parse_returns_the_pydantic_object(engine_server):
    sdk = openai.OpenAI(base_url=engine_server.url, api_key="unused", max_retries=0)
    r = sdk.chat.completions.parse(model="rand", messages=[{"role": "user", "content": "a pet"}],
                                   response_format=Pet, max_tokens=60, seed=1)
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.age <= 30


def test_langchain_with_structured_output(engine_server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="rand", base_url=engine_server.url, api_key="unused", max_retries=0, max_tokens=60)
    pet = llm.with_structured_output(Pet, method="json_schema").invoke("a pet")
    assert isinstance(pet, Pet)


def test_unenforceable_or_oversized_schemas_are_a_400_naming_the_field(client):
    r = client.post("/chat/completions", json={
        "model": "rand", "messages": [{"role": "user", "content": "hi"}],
        "response_format": json_format("remote", {"$ref": "https://example.com/schema.json"})})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format.json_schema.schema" and "cannot be enforced" in err["message"]
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                            for i in range(1000)}}
    r = client.post("/chat/completions", json={
        "model": "rand", "messages": [{"role": "user", "content": "hi"}], "response_format": json_format("big", big)})
    assert r.status_code == 400 and "KiB" in r.json()["error"]["message"]
    r = client.post("/chat/completions", json={
        "model": "rand", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("response_format")


def test_a_schema_failing_at_its_first_tokens_is_a_short_400_and_the_model_keeps_serving(client):
    many = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(600)}}
    for stream_ in (False, True):
        r = client.post("/chat/completions", json={
            "model": "rand", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30,
            "stream": stream_, "response_format": json_format("many", many)})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "response_format.json_schema.schema" and len(err["message"]) < 500
    chat(client, max_tokens=4)


def test_stop_sequences_apply_to_constrained_output(client):
    """A stop sequence cuts the JSON where it appears (finish_reason "stop"), as it cuts any reply."""
    fmt = json_format("nested", SCHEMAS["nested"])
    whole = chat(client, response_format=fmt, seed=5, temperature=1.0)["choices"][0]["message"]["content"]
    assert '"tags"' in whole
    cut = chat(client, response_format=fmt, seed=5, temperature=1.0, stop=['"tags"'])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == whole[:whole.index('"tags"')]
