"""Response objects (`resp_...`) from the chat service's results, with the request's parameters echoed."""

from __future__ import annotations

import time
from dataclasses import dataclass

from server.protocol.responses_api import (
    CreateResponse,
    FunctionCallItem,
    FunctionTool,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseObject,
    ResponseUsage,
    ToolChoiceFunction,
)
from server.responses.items import new_id


@dataclass
class Shell:
    """What every object of one response shares: its id, time, model and the echoed request."""

    id: str
    created_at: int
    model: str
    req: CreateResponse
    temperature: float
    top_p: float
    stored: bool

    def response(self, status: str, output: list | None = None, usage: ResponseUsage | None = None,
                 error: ResponseError | None = None) -> dict:
        """The response object in this state, as JSON-ready data."""
        req = self.req
        obj = ResponseObject(
            id=self.id, created_at=self.created_at, status=status, model=self.model, output=output or [],
            usage=usage, error=error, instructions=req.instructions, max_output_tokens=req.max_output_tokens,
            temperature=self.temperature, top_p=self.top_p, tools=[_tool(t) for t in req.tools or []],
            tool_choice=_choice(req.tool_choice), parallel_tool_calls=req.parallel_tool_calls is not False,
            text=_text(req), metadata=req.metadata or {}, store=self.stored,
            previous_response_id=req.previous_response_id, user=req.user,
            completed_at=int(time.time()) if status == "completed" else None,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            service_tier=req.service_tier if req.service_tier in ("auto", "default") else "default")
        out = obj.model_dump(mode="json")
        for name in ("user", "usage"):  # objects or strings in OpenAI's schema when present, never null
            if out[name] is None:
                del out[name]
        return out


def _tool(tool: FunctionTool) -> dict:
    return {"type": "function", "name": tool.name, "description": tool.description,
            "parameters": tool.parameters, "strict": tool.strict}


def _choice(choice: object) -> object:
    if isinstance(choice, ToolChoiceFunction):
        return {"type": "function", "name": choice.name}
    return choice if choice is not None else "auto"


def _text(req: CreateResponse) -> dict:
    if req.text is None or req.text.format is None:
        return {"format": {"type": "text"}}
    return {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)}


def usage_of(chat_usage: dict | None) -> ResponseUsage | None:
    """The chat usage as the Responses' usage (input/output tokens, cached input tokens)."""
    if not chat_usage:
        return None
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return ResponseUsage(input_tokens=chat_usage["prompt_tokens"], output_tokens=chat_usage["completion_tokens"],
                         total_tokens=chat_usage["total_tokens"],
                         input_tokens_details=InputTokensDetails(cached_tokens=cached))


def message_item(text: str, status: str, item_id: str | None = None) -> OutputMessage:
    """An assistant message item with one output_text part."""
    return OutputMessage(id=item_id or new_id("msg"), status=status, content=[OutputText(text=text)])


def call_item(call: dict, status: str = "completed", item_id: str | None = None) -> FunctionCallItem:
    """A function_call item from a chat tool call ({id, function: {name, arguments}})."""
    return FunctionCallItem(id=item_id or new_id("fc"), status=status, call_id=call["id"],
                            name=call["function"]["name"], arguments=call["function"]["arguments"])


def from_chat(shell: Shell, chat: dict) -> dict:
    """The whole response from a non-streamed chat completion."""
    choice = chat["choices"][0]
    message = choice["message"]
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    output: list = []
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:
        output.append(message_item(message.get("content") or "", status))
    output += [call_item(c) for c in calls]
    return shell.response(status, output, usage_of(chat.get("usage")))
