"""A chat completion stream as the Responses API's typed events, each with an increasing sequence_number."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from server.protocol.responses_api import (
    FunctionCallItem,
    OutputMessage,
    OutputText,
    ResponseError,
)
from server.responses.build import Shell, message_item, usage_of
from server.responses.items import new_id

Event = tuple[str, dict]  # (type, the event's JSON-ready data)
_ERROR_CODES = {"rate_limit_exceeded"}  # error codes OpenAI's ResponseError knows; the rest are server_error


class ResponseEvents:
    """Translates one chat stream (JSON payloads ending with [DONE]) into Responses events; the final one is
    response.completed, .incomplete or .failed. `save` stores the final response before that event is sent."""

    def __init__(self, chat_stream, shell: Shell, save: Callable[[dict], Awaitable[None]]) -> None:
        self.chat = chat_stream
        self.shell = shell
        self.save = save
        self.seq = 0
        self.output: list[OutputMessage | FunctionCallItem] = []
        self.message: OutputMessage | None = None  # the open message item, while text arrives
        self.finish: str | None = None
        self.usage: dict | None = None

    def close(self) -> None:
        """End the request if the stream did not (the chat stream's close is idempotent)."""
        self.chat.close()

    def _event(self, kind: str, **data) -> Event:
        event = (kind, {"type": kind, "sequence_number": self.seq, **data})
        self.seq += 1
        return event

    async def events(self) -> AsyncIterator[Event]:
        """Every event of the response, in order."""
        shell = self.shell
        yield self._event("response.created", response=shell.response("in_progress"))
        yield self._event("response.in_progress", response=shell.response("in_progress"))
        error: dict | None = None
        async with aclosing(self.chat.events()) as payloads:
            async for payload in payloads:
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    error = chunk["error"]
                    continue
                for event in self._chunk(chunk):
                    yield event
        for event in self._close_items("incomplete" if self.finish == "length" or error else "completed",
                                       error is None):
            yield event
        async for event in self._final(error):
            yield event

    def _chunk(self, chunk: dict) -> list[Event]:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        out: list[Event] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                out += self._call(call)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return out

    def _text(self, text: str) -> list[Event]:
        out = [] if self.message is not None else self._open_message()
        self.message.content[0].text += text
        return out + [self._event("response.output_text.delta", item_id=self.message.id,
                                  output_index=len(self.output) - 1, content_index=0, delta=text, logprobs=[])]

    def _open_message(self) -> list[Event]:
        self.message = message_item("", "in_progress")
        self.output.append(self.message)
        index = len(self.output) - 1
        empty = OutputMessage(id=self.message.id, status="in_progress", content=[])
        return [self._event("response.output_item.added", output_index=index, item=empty.model_dump()),
                self._event("response.content_part.added", item_id=self.message.id, output_index=index,
                            content_index=0, part=OutputText(text="").model_dump())]

    def _call(self, call: dict) -> list[Event]:
        """A call's first delta (id and name) opens its item; the next carries all its arguments."""
        out = self._close_message("completed") if self.message is not None else []
        fn = call.get("function") or {}
        if call.get("id"):
            item = FunctionCallItem(id=new_id("fc"), status="in_progress", call_id=call["id"], name=fn["name"],
                                    arguments="")
            self.output.append(item)
            return out + [self._event("response.output_item.added", output_index=len(self.output) - 1,
                                      item=item.model_dump())]
        item = self.output[-1]
        item.arguments += fn.get("arguments") or ""
        return out + [self._event("response.function_call_arguments.delta", item_id=item.id,
                                  output_index=len(self.output) - 1, delta=fn.get("arguments") or "")]

    def _close_message(self, status: str) -> list[Event]:
        item, self.message = self.message, None
        index = self.output.index(item)
        part = item.content[0]
        item.status = status
        return [self._event("response.output_text.done", item_id=item.id, output_index=index, content_index=0,
                            text=part.text, logprobs=[]),
                self._event("response.content_part.done", item_id=item.id, output_index=index, content_index=0,
                            part=part.model_dump()),
                self._event("response.output_item.done", output_index=index, item=item.model_dump())]

    def _close_items(self, status: str, whole: bool) -> list[Event]:
        """Close what is open: the message (a whole reply always has one, even empty), then every call."""
        out: list[Event] = []
        if not self.output and whole:
            out += self._open_message()
        if self.message is not None:
            out += self._close_message(status)
        for index, item in enumerate(self.output):
            if isinstance(item, FunctionCallItem) and item.status == "in_progress":
                item.status = "completed" if whole else "incomplete"
                out += [self._event("response.function_call_arguments.done", item_id=item.id,
                                    output_index=index, name=item.name, arguments=item.arguments),
                        self._event("response.output_item.done", output_index=index, item=item.model_dump())]
        return out

    async def _final(self, error: dict | None) -> AsyncIterator[Event]:
        """Store the final response, then send it as the last event."""
        if error is not None:
            code = error.get("code") if error.get("code") in _ERROR_CODES else "server_error"
            failure = ResponseError(code=code, message=error.get("message") or "The response failed.")
            final = self.shell.response("failed", self.output, usage_of(self.usage), failure)
            kind = "response.failed"
        else:
            status = "incomplete" if self.finish == "length" else "completed"
            final = self.shell.response(status, self.output, usage_of(self.usage))
            kind = f"response.{status}"
        await self.save(final)
        yield self._event(kind, response=final)
