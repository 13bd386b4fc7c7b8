"""Validate response bodies against OpenAI's own schemas (tests/openai_schemas.json, from the OpenAPI spec)."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import jsonschema

SCHEMAS = Path(__file__).with_name("openai_schemas.json")


def _fix_nullable(node):
    """OpenAPI's `nullable: true` → JSON Schema anyOf [X, null] (plain validators ignore the keyword)."""
    if isinstance(node, list):
        return [_fix_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _fix_nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@lru_cache(maxsize=1)
def _doc() -> dict:
    doc = json.loads(SCHEMAS.read_text())
    doc["components"] = _fix_nullable(copy.deepcopy(doc["components"]))
    return doc


@lru_cache(maxsize=1)
def _chunk_components() -> dict:
    """The spec reuses CreateCompletionResponse for stream chunks, whose finish_reason is null until
    a choice's last chunk (OpenAI's own example shows this), and with stream_options.include_usage
    every chunk but the last carries "usage": null (as in the chat chunk schema). Allow exactly these
    two nulls, in chunks only."""
    components = copy.deepcopy(_doc()["components"])
    props = components["schemas"]["CreateCompletionResponse"]["properties"]
    props["usage"] = {"anyOf": [props["usage"], {"type": "null"}]}
    choice = props["choices"]["items"]
    choice["properties"]["finish_reason"] = {"anyOf": [choice["properties"]["finish_reason"],
                                                       {"type": "null"}]}
    return components


def validate(root: str, obj: object) -> None:
    """Raise jsonschema.ValidationError unless obj matches the named root (e.g. 'chat_chunk')."""
    doc = _doc()
    name = doc["roots"][root]
    components = _chunk_components() if root == "completion_chunk" else doc["components"]
    schema = {"$ref": f"#/components/schemas/{name}", "components": components}
    jsonschema.Draft202012Validator(schema).validate(obj)


def usage_counts(usage: dict) -> tuple[int, int, int]:
    """(prompt, completion, total) of a usage object, checking the prompt-cache detail is consistent."""
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert 0 <= cached < max(usage["prompt_tokens"], 1)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]


# A JSON schema whose every value is bounded: constrained output from any model (even random weights) ends
# well within a test's max_tokens (the engine tests of constrained decoding use it).
BOUNDED_OBJECT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
        "code": {"type": "string", "pattern": "^[a-z]{2}[0-9]$"},
    },
    "required": ["name", "n", "ok", "code"],
    "additionalProperties": False,
}
