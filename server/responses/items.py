"""Input items of a Responses request, checked field by field and normalised (400s name the exact field)."""

from __future__ import annotations

import secrets
from typing import Any

from server.errors import bad_request, shorten, unsupported

_MESSAGE_KEYS = {"type", "role", "content", "id", "status", "phase"}
_CALL_KEYS = {"type", "id", "call_id", "name", "arguments", "status"}
_OUTPUT_KEYS = {"type", "id", "call_id", "output", "status"}
_PART_KEYS = {"input_text": {"type", "text"}, "output_text": {"type", "text", "annotations", "logprobs"},
              "refusal": {"type", "refusal"}}
_ROLES = ("user", "system", "developer", "assistant")
_STATUSES = ("in_progress", "completed", "incomplete")
_NOT_TEXT = {"input_image": "image", "input_file": "file", "input_audio": "audio"}


def new_id(prefix: str) -> str:
    """A fresh item or response id: prefix_ and 48 random hex digits."""
    return f"{prefix}_{secrets.token_hex(24)}"


def normalise(given: str | list[dict[str, Any]] | None) -> list[dict]:
    """The input as a list of message, function_call and function_call_output items, each with an id."""
    if given is None:
        return []
    if isinstance(given, str):
        return [_message("user", [{"type": "input_text", "text": given}])]
    return [_item(item, f"input[{i}]") for i, item in enumerate(given)]


def _message(role: str, content: list[dict], item_id: str | None = None) -> dict:
    return {"id": item_id or new_id("msg"), "type": "message", "role": role, "content": content}


def _item(item: dict, where: str) -> dict:
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        return _message_item(item, where)
    if kind == "function_call":
        _keys(item, _CALL_KEYS, where)
        _status(item, where)
        call_id, name = _text(item, "call_id", where), _text(item, "name", where)
        return {"id": _id(item, "fc", where), "type": "function_call", "call_id": call_id, "name": name,
                "arguments": _text(item, "arguments", where), "status": "completed"}
    if kind == "function_call_output":
        _keys(item, _OUTPUT_KEYS, where)
        _status(item, where)
        return {"id": _id(item, "fco", where), "type": "function_call_output",
                "call_id": _text(item, "call_id", where), "output": _output(item.get("output"), where),
                "status": "completed"}
    if kind is None:
        raise bad_request(f"{where} needs a `type` (message, function_call or function_call_output) or a "
                          f"`role`.", f"{where}.type")
    raise unsupported(f"{where}.type", f"only message, function_call and function_call_output items are "
                                       f"supported, got '{shorten(str(kind), 60)}'")


def _message_item(item: dict, where: str) -> dict:
    _keys(item, _MESSAGE_KEYS, where)
    _status(item, where)
    role = item.get("role")
    if role not in _ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(_ROLES)}.", f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        parts = [_part({"type": "output_text" if role == "assistant" else "input_text", "text": content}, where)]
    elif isinstance(content, list):
        parts = [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
    else:
        raise bad_request(f"{where}.content must be a string or a list of content parts.", f"{where}.content")
    return _message(role, parts, _id(item, "msg", where))


def _part(part: Any, where: str) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in _NOT_TEXT:
        raise unsupported(f"{where}.type", f"{_NOT_TEXT[kind]} input is not supported by these text models")
    if kind not in _PART_KEYS:
        raise bad_request(f"{where} must be an input_text or output_text part.", f"{where}.type")
    _keys(part, _PART_KEYS[kind], where)
    if kind == "refusal":
        return {"type": "output_text", "text": _text(part, "refusal", where), "annotations": []}
    if kind == "output_text":
        return {"type": kind, "text": _text(part, "text", where), "annotations": []}
    return {"type": kind, "text": _text(part, "text", where)}


def _output(output: Any, where: str) -> str:
    """A function_call_output's output: a string, or input_text parts (joined)."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        parts = [_part(p, f"{where}.output[{j}]") for j, p in enumerate(output)]
        return "\n".join(p["text"] for p in parts)
    raise bad_request(f"{where}.output must be a string or a list of input_text parts.", f"{where}.output")


def _keys(obj: dict, allowed: set[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise bad_request(f"Unrecognized key `{shorten(str(key), 60)}` in {where}.",
                              f"{where}.{shorten(str(key), 60)}", "unknown_parameter")


def _status(item: dict, where: str) -> None:
    """An item's `status`, when given, is one of OpenAI's three (it is not used otherwise)."""
    if item.get("status") is not None and item["status"] not in _STATUSES:
        raise bad_request(f"{where}.status must be one of {', '.join(_STATUSES)}.", f"{where}.status")


def _text(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{where}.{key} must be a string.", f"{where}.{key}")
    return value


def _id(obj: dict, prefix: str, where: str) -> str:
    value = obj.get("id")
    if value is None:
        return new_id(prefix)
    if not isinstance(value, str) or not value:
        raise bad_request(f"{where}.id must be a non-empty string.", f"{where}.id")
    return value


def replayed(items: list[dict], output: list[dict]) -> list[dict]:
    """A stored response's input then its output, as input items of the next response in a chain."""
    out = list(items)
    for item in output:
        if item["type"] == "message":
            parts = [{"type": "output_text", "text": c["text"], "annotations": []} for c in item["content"]]
            out.append(_message("assistant", parts, item["id"]))
        elif item["type"] == "function_call":
            out.append({k: item[k] for k in ("id", "type", "call_id", "name", "arguments", "status")})
    return out
