"""Tool calling: tools and tool_choice as a grammar the engine enforces, and the reply split into text or calls.

The calling convention is the template's: `tool_marker` then a compact JSON array of
`{"name": ..., "arguments": {...}}`. "required" or a named function: the reply IS the marker and the array;
"auto": either text that does not start with the marker, or the marker and the array; "none": no grammar,
the tools are not shown. The legacy `functions`/`function_call` fields map to the same machinery.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from backends.grammar import Constraint, GrammarError, json_schema, lark
from backends.registry import ServedModel
from server.errors import bad_request
from server.protocol.requests import ChatCompletionRequest, FunctionDefinition
from server.structured import MAX_SCHEMA_BYTES, checked, refused

MAX_PARALLEL = 4  # calls in one reply when parallel_tool_calls is true (a bound, so a reply always ends)


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asks of tools: the listing for the prompt, the grammar, the reply's shape."""

    tools: list[dict]  # name, description, parameters: what the template presents (empty with "none")
    constraint: Constraint
    marker: str
    legacy: bool = False  # `functions`: the reply is message.function_call, finish_reason "function_call"


def tool_plan(req: ChatCompletionRequest, model: ServedModel) -> ToolPlan | None:
    """The request's tool plan (None when it offers no tools); 400s name the offending parameter."""
    if req.tools and req.functions:
        raise bad_request("Use either tools or functions, not both.", "functions")
    legacy = bool(req.functions) or (req.function_call is not None and not req.tools)
    defs, choice_param = _definitions(req, legacy, model)
    choice = _choice(req, legacy, defs, choice_param)
    marker = model.template.tool_marker
    if not defs or choice == "none":
        return None  # the tools are neither shown nor callable: a plain reply
    tools = [{"name": d.name, "description": d.description, "parameters": d.parameters} for d in defs]
    allowed = [t for t in tools if choice in ("auto", "required") or t["name"] == choice]
    parallel = not legacy and req.parallel_tool_calls is not False
    schema = calls_schema(allowed, MAX_PARALLEL if parallel else 1)
    try:
        grammar = calls_grammar(marker, schema, free_text=choice == "auto")
    except GrammarError as exc:
        raise refused(choice_param[0], exc) from None
    return ToolPlan(tools, checked(grammar, model, choice_param[0]), marker, legacy)


def _definitions(req: ChatCompletionRequest, legacy: bool,
                 model: ServedModel) -> tuple[list[FunctionDefinition], tuple[str, str]]:
    """The function definitions, each parameters schema checked; (tools param, choice param) names."""
    if legacy:
        defs, params = list(req.functions or []), ("functions", "function_call")
        where = [f"functions[{i}].parameters" for i in range(len(defs))]
    else:
        defs, params = [t.function for t in req.tools or []], ("tools", "tool_choice")
        where = [f"tools[{i}].function.parameters" for i in range(len(defs))]
    if len(json.dumps([d.parameters for d in defs])) > MAX_SCHEMA_BYTES:  # before compiling any of them
        raise bad_request(f"The tools' parameters are larger than {MAX_SCHEMA_BYTES // 1024} KiB.", params[0])
    seen: set[str] = set()
    for d, param in zip(defs, where):
        if d.name in seen:
            raise bad_request(f"Two tools are named {d.name!r}.", params[0])
        seen.add(d.name)
        if d.parameters is not None:
            try:
                constraint = json_schema(object_parameters(d.parameters, param))
            except GrammarError as exc:
                raise refused(param, exc) from None
            checked(constraint, model, param)
    return defs, params


def object_parameters(params: dict | None, param: str) -> dict:
    """A tool's parameters as an object schema (a 400 naming param when they do not describe an object)."""
    if not params:
        return {"type": "object"}
    if not isinstance(params, dict):
        raise bad_request(f"{param} must be a JSON Schema object.", param)
    if params.get("type", "object" if "properties" in params else None) != "object":
        raise bad_request(f"{param} must be a JSON Schema of type 'object'.", param)
    return {**params, "type": "object"}


def _choice(req: ChatCompletionRequest, legacy: bool, defs: list[FunctionDefinition],
            params: tuple[str, str]) -> str:
    """'none', 'auto', 'required' or the forced function's name (400 for a name that is not offered)."""
    value = req.function_call if legacy else req.tool_choice
    if value is None:
        return "auto" if defs else "none"
    if isinstance(value, str):
        if value != "none" and not defs:
            raise bad_request(f"{params[1]} is {value!r} but no {params[0]} are given.", params[1])
        return value
    name = value.name if legacy else value.function.name
    if name not in {d.name for d in defs}:
        raise bad_request(f"{params[1]} names {name!r}, which is not in {params[0]}.", params[1])
    return name


def calls_schema(tools: list[dict], max_calls: int) -> dict:
    """JSON Schema of the call array: 1..max_calls items, each one of the allowed tools with its arguments.

    Each tool's parameters become the root's `$defs/tool_<i>`, their own `#...` references rebased there,
    so `$defs`, `definitions` and any pointer inside them resolve as in the tool's own schema."""
    defs: dict = {}
    variants = []
    for i, t in enumerate(tools):
        key = f"tool_{i}"
        defs[key] = _rebased(object_parameters(t["parameters"], "tools"), f"#/$defs/{key}")
        variants.append({"type": "object", "properties": {"name": {"const": t["name"]},
                                                          "arguments": {"$ref": f"#/$defs/{key}"}},
                         "required": ["name", "arguments"], "additionalProperties": False})
    items = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {"type": "array", "items": items, "minItems": 1, "maxItems": max_calls,
            "x-guidance": {"whitespace_flexible": False}, "$defs": defs}


_DATA_KEYWORDS = {"const", "enum", "default", "examples"}  # values, not schemas: their "$ref" is data
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}


def _rebased(schema: object, base: str) -> object:
    """A copy of a schema with every local reference ("#..." ) moved under base."""
    if isinstance(schema, list):
        return [_rebased(v, base) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = base + value[1:]
        elif key in _DATA_KEYWORDS:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):  # names mapped to schemas: names stay as they are
            out[key] = {name: _rebased(sub, base) for name, sub in value.items()}
        else:
            out[key] = _rebased(value, base)
    return out


def calls_grammar(marker: str, schema: dict, free_text: bool) -> Constraint:
    """The marker then the call array; with free_text, also any text that does not start with the marker."""
    call = f"call: {json.dumps(marker)} calls\ncalls: %json {json.dumps(schema)}\n"
    if not free_text:
        return lark("start: call\n" + call)
    avoid = "".join(f"\\x{b:02x}" for b in marker.encode())
    return lark(f"start: text | call\n{call}text: TEXT\nTEXT: /(?s:.*)/ & ~/(?s:{avoid}.*)/\n")


def new_call_id() -> str:
    """A fresh tool call id, as OpenAI's: call_ and random letters."""
    return "call_" + secrets.token_hex(12)


@dataclass
class Reply:
    """A choice's reply split into text or calls (name, JSON-encoded arguments, id)."""

    text: str | None
    calls: list[dict] = field(default_factory=list)


def parse_calls(text: str, marker: str) -> list[dict] | None:
    """The calls in a reply that is the marker and a complete call array, else None."""
    if not text.startswith(marker):
        return None
    try:
        calls = json.loads(text[len(marker):])
    except ValueError:
        return None
    if not (isinstance(calls, list) and calls and all(_is_call(c) for c in calls)):
        return None
    return [{"id": new_call_id(), "name": c["name"],
             "arguments": json.dumps(c["arguments"], separators=(",", ":"), ensure_ascii=False)} for c in calls]


def _is_call(call: object) -> bool:
    return isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)


class CallSplitter:
    """Streams a choice's text, holding back what could still be the marker; a reply that starts with the
    marker is held whole and becomes calls at the end (or, cut short, its raw text)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self._held = ""
        self._text_mode = False

    def feed(self, text: str) -> str:
        """Text that is now safe to send as content ("" while the reply could still be a call)."""
        if self._text_mode:
            return text
        self._held += text
        if self.marker.startswith(self._held) or self._held.startswith(self.marker):
            return ""
        self._text_mode = True
        out, self._held = self._held, ""
        return out

    def finish(self, text: str = "") -> Reply:
        """The end of the reply: its remaining text, or its calls when it is a complete call."""
        rest = self.feed(text)
        if self._text_mode:
            return Reply(rest)
        held, self._held = self._held, ""
        calls = parse_calls(held, self.marker)
        return Reply(None, calls) if calls else Reply(held)


def split_reply(text: str, marker: str) -> Reply:
    """A whole reply as text or calls (the same split a stream makes)."""
    return CallSplitter(marker).finish(text)
