"""Structured outputs: a chat request's response_format as a grammar the engine enforces token by token."""

from __future__ import annotations

import json

from backends.grammar import Constraint, GrammarError, check, json_object, json_schema
from backends.registry import ServedModel
from server.errors import APIError, bad_request
from server.protocol.requests import ResponseFormatJsonObject, ResponseFormatJsonSchema, ResponseFormatText

MAX_SCHEMA_BYTES = 64 * 1024  # a schema is compiled on the event loop's thread pool: keep it small


def constraint_for(fmt: ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema | None,
                   model: ServedModel) -> Constraint | None:
    """The grammar for a response_format (None for text); a 400 naming what cannot be enforced."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return checked(json_object(), model, "response_format")
    schema = fmt.json_schema.schema_
    param = "response_format.json_schema.schema"
    if schema is None:  # a name without a schema: any JSON object, as OpenAI's JSON mode
        return checked(json_object(), model, param)
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise bad_request(f"{param} is larger than {MAX_SCHEMA_BYTES // 1024} KiB.", param)
    try:
        constraint = json_schema(schema)
    except GrammarError as exc:
        raise refused(param, exc) from None
    return checked(constraint, model, param)


def checked(constraint: Constraint, model: ServedModel, param: str) -> Constraint:
    """The constraint, once it is known to compile against the model's vocabulary."""
    try:
        check(constraint, model.tokenizer.pieces, model.info.eos_token_id)
    except GrammarError as exc:
        raise refused(param, exc) from None
    return constraint


def refused(param: str, exc: GrammarError) -> APIError:
    """The 400 for a grammar that cannot be enforced, naming the parameter and llguidance's reason."""
    return bad_request(f"{param} cannot be enforced: {exc}", param)
