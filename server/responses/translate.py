"""A Responses request as a chat completions request (the chat service does the work), and its errors back."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.errors import APIError, bad_request, shorten, unsupported
from server.protocol.requests import ChatCompletionRequest
from server.protocol.responses_api import (
    CreateResponse,
    FormatJsonSchema,
    FunctionTool,
    OtherFormat,
    ToolChoiceFunction,
)

# OpenAI fields accepted only with a value that asks for nothing special
_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "background": (lambda v: not v, "background responses are not supported"),
    "include": (lambda v: not v, "there are no extra output data to include"),
    "reasoning": (lambda v: not v or not any(v.values()), "these models do not reason"),
    "truncation": (lambda v: v in (None, "disabled"), "only 'disabled' exists here: a conversation that does "
                                                      "not fit the context is a 400"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "only 'auto' and 'default' exist here"),
    "prompt": (lambda v: v is None, "stored prompts are not supported"),
    "conversation": (lambda v: v is None, "conversations are not supported; use previous_response_id"),
    "context_management": (lambda v: v is None, "context management is not supported"),
    "max_tool_calls": (lambda v: v is None, "not supported"),
    "top_logprobs": (lambda v: not v, "log-probabilities are not returned by the Responses API here; use "
                                      "/v1/chat/completions"),
    "prompt_cache_key": (lambda v: v is None, "prefix caching is automatic; no key is needed"),
    "prompt_cache_retention": (lambda v: v is None, "prefix caching is automatic"),
    "moderation": (lambda v: v is None, "moderation is not available"),
}
MAX_METADATA = 16


@dataclass
class ParamMap:
    """Where each chat message (and each of its tool calls) came from in the Responses request."""

    messages: list[tuple[str, str]] = field(default_factory=list)  # (item path, its content field)
    calls: dict[tuple[int, int], str] = field(default_factory=dict)

    def rename(self, param: str) -> str:
        """A chat parameter path as the Responses one."""
        m = re.match(r"^messages\[(\d+)\](?:\.tool_calls\[(\d+)\]\.function)?(.*)$", param)
        if m and int(m[1]) < len(self.messages):
            where, content = self.messages[int(m[1])]
            if m[2] is not None:
                return self.calls.get((int(m[1]), int(m[2])), where) + m[3]
            if m[3].startswith(".content"):
                return where + (f".{content}" if content else "") + m[3][len(".content"):]
            return where + m[3]
        for old, new in _RENAMES:
            if param == old or param.startswith((old + ".", old + "[")):
                return new + param[len(old):]
        return param


_RENAMES = [("messages", "input"), ("max_completion_tokens", "max_output_tokens"),
            ("max_tokens", "max_output_tokens"), ("response_format.json_schema", "text.format"),
            ("response_format", "text.format")]


def renamed(exc: APIError, params: ParamMap) -> APIError:
    """The chat service's error with its parameter named as in the Responses request (message too)."""
    if not exc.param:
        return exc
    new = params.rename(exc.param)
    new = re.sub(r"^tools\[(\d+)\]\.function\.", r"tools[\1].", new)
    if new != exc.param:
        exc.message = exc.message.replace(exc.param, new)
        exc.param = new
    return exc


def check_request(req: CreateResponse) -> None:
    """400s for what this server does not do, each naming its field."""
    for name, (ok, why) in _NEUTRAL.items():
        if not ok(getattr(req, name)):
            raise unsupported(name, why)
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
    if req.stream_options is not None and req.stream_options.include_obfuscation:
        raise unsupported("stream_options.include_obfuscation")
    if req.text is not None and isinstance(req.text.format, OtherFormat):
        raise bad_request(f"text.format.type must be 'text', 'json_object' or 'json_schema', got "
                          f"'{shorten(str(req.text.format.type), 60)}'.", "text.format.type")
    if req.text is not None and req.text.verbosity not in (None, "medium"):
        raise unsupported("text.verbosity", "only the default, 'medium', exists here")
    for i, tool in enumerate(req.tools or []):
        if not isinstance(tool, FunctionTool):
            raise unsupported(f"tools[{i}].type", f"built-in tools are not available here, only function tools "
                                                  f"(got '{str(tool.type)[:60]}')")
    if isinstance(req.tool_choice, dict):
        raise unsupported("tool_choice", "only 'none', 'auto', 'required' or {type: function, name} are supported")
    _check_metadata(req.metadata)
    if req.input is None and req.previous_response_id is None:
        raise bad_request("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    if isinstance(req.input, list) and not req.input and req.previous_response_id is None:
        raise bad_request("input must not be an empty list.", "input")


def _check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's bounds: at most 16 pairs, keys up to 64 characters, values up to 512."""
    if not metadata:
        return
    if len(metadata) > MAX_METADATA:
        raise bad_request(f"metadata has {len(metadata)} keys; at most {MAX_METADATA} are allowed.", "metadata")
    for key, value in metadata.items():
        if len(key) > 64 or len(value) > 512:
            raise bad_request("metadata keys are at most 64 characters and values at most 512.", "metadata")


def chat_request(req: CreateResponse, history: list[dict], items: list[dict]) -> tuple[ChatCompletionRequest,
                                                                                        ParamMap]:
    """The chat request that does the work of this response: instructions, the replayed history, the input."""
    params = ParamMap()
    messages: list[dict] = []
    if req.instructions is not None:
        messages.append({"role": "system", "content": req.instructions})
        params.messages.append(("instructions", ""))
    calls: set[str] = set()
    for where, item in [("previous_response_id", h) for h in history] + \
                       [(f"input[{i}]", it) for i, it in enumerate(items)]:
        _answers_a_call(item, where, calls)
        _add(messages, params, item, where)
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": bool(req.stream)}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    for name, value in (("max_completion_tokens", req.max_output_tokens), ("temperature", req.temperature),
                        ("top_p", req.top_p), ("parallel_tool_calls", req.parallel_tool_calls),
                        ("user", req.user), ("safety_identifier", req.safety_identifier)):
        if value is not None:
            body[name] = value
    if req.text is not None and req.text.format is not None:
        body["response_format"] = _format(req.text.format)
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                         for t in req.tools]
    if req.tool_choice is not None:
        choice = req.tool_choice
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}} \
            if isinstance(choice, ToolChoiceFunction) else choice
    return ChatCompletionRequest.model_validate(body), params


def _format(fmt: Any) -> dict:
    if isinstance(fmt, FormatJsonSchema):
        spec = {"name": fmt.name, "schema": fmt.schema_}
        if fmt.description is not None:
            spec["description"] = fmt.description
        if fmt.strict is not None:
            spec["strict"] = fmt.strict
        return {"type": "json_schema", "json_schema": spec}
    return {"type": fmt.type}


def _answers_a_call(item: dict, where: str, calls: set[str]) -> None:
    """A function_call_output answers a function_call earlier in the conversation (as OpenAI checks)."""
    if item["type"] == "function_call":
        calls.add(item["call_id"])
    elif item["type"] == "function_call_output" and item["call_id"] not in calls:
        raise bad_request(f"No tool call found for function call output with call_id "
                          f"'{shorten(item['call_id'], 100)}'.", f"{where}.call_id")


def _add(messages: list[dict], params: ParamMap, item: dict, where: str) -> None:
    """One input item as a chat message (consecutive function calls join one assistant message)."""
    if item["type"] == "message":
        parts = [{"type": "text", "text": p["text"]} for p in item["content"]]
        messages.append({"role": item["role"], "content": parts or ""})
        params.messages.append((where, "content"))
    elif item["type"] == "function_call_output":
        messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        params.messages.append((where, "output"))
    else:
        call = {"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}}
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": None, "tool_calls": []}
            messages.append(last)
            params.messages.append((where, "content"))
        last.setdefault("tool_calls", []).append(call)
        params.calls[(len(messages) - 1, len(last["tool_calls"]) - 1)] = where
