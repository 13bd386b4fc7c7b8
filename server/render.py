"""Builds OpenAI response objects and stream chunks from choice states (one home for the shapes)."""

from __future__ import annotations

import json
import math

from backends.types import TokenLogprob
from server.errors import APIError, json_text
from server.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatLogprobs,
    Completion, CompletionChoice, CompletionLogprobs, Delta, TokenLogprobOut, TopLogprob, Usage,
)
from server.protocol.responses import FunctionCall, FunctionCallDelta, PromptTokensDetails, ToolCall, ToolCallDelta
from server.streaming import TokenRecord


def non_finite_error() -> APIError:
    """The engine produced NaN or an infinity: its weights are likely corrupt. Never sent as JSON numbers."""
    return APIError(500, "The model produced a non-finite log-probability (NaN or infinity); its weights "
                         "may be corrupt.", type="server_error", code="engine_error")


def dumps(obj: object) -> str:
    """A stream payload's JSON: always valid (NaN or an infinity becomes an engine error, see json_text)."""
    try:
        return json_text(obj)
    except ValueError:
        raise non_finite_error() from None


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise non_finite_error()
    return value


def token_text(piece: bytes) -> str:
    """A token as text for logprobs; one that is not whole UTF-8 (a character split across byte tokens) is
    written as OpenAI does, `bytes:\\xe2\\x80`, so different byte tokens never share a text (or a
    top_logprobs key) and the exact bytes can be recovered."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    """Usage with total = prompt + completion, and how many prompt tokens came from the prefix cache."""
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def completion_logprobs(records: list[TokenRecord], offset: int) -> CompletionLogprobs:
    """Legacy logprobs: tokens, their logprobs, top alternatives and character offsets in the choice's text
    (`offset`: characters before the generated text, i.e. an echoed prompt; a token that only starts a
    character has the offset of that character)."""
    tokens, lps, tops, offsets = [], [], [], []
    for rec in records:
        lp: TokenLogprob = rec.logprob  # type: ignore[assignment]
        text = token_text(rec.piece)
        tokens.append(text)
        lps.append(_finite(lp.logprob))
        tops.append({token_text(p): _finite(v) for p, v in lp.top})
        offsets.append(offset + rec.start)
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)


def chat_logprobs(records: list[TokenRecord]) -> ChatLogprobs:
    """Chat logprobs: one entry per token with bytes and top alternatives."""
    content = []
    for rec in records:
        lp: TokenLogprob = rec.logprob  # type: ignore[assignment]
        top = [TopLogprob(token=token_text(p), logprob=_finite(v), bytes=list(p)) for p, v in lp.top]
        content.append(TokenLogprobOut(token=token_text(rec.piece), logprob=_finite(lp.logprob),
                                       bytes=list(rec.piece), top_logprobs=top))
    return ChatLogprobs(content=content, refusal=None)


_SLOT = "\u0000slot\u0000"  # a placeholder no real text can produce in JSON-encoded form
_SLOT_JSON = json.dumps(_SLOT)


class TextChunkTemplate:
    """The JSON of a text-only stream chunk, rendered once by the protocol models, filled per token.

    The shape comes from pydantic (the one source of truth); only the text is spliced in, so the
    per-token cost is one json.dumps of the text instead of building and dumping a model.
    """

    def __init__(self, sample: dict) -> None:
        encoded = json_text(sample)
        self.head, self.tail = encoded.split(_SLOT_JSON)

    def fill(self, text: str) -> str:
        """The chunk's JSON with this text."""
        return self.head + json.dumps(text, ensure_ascii=False) + self.tail


class Renderer:
    """Shapes for one request: same id, created and model on every object."""

    def __init__(self, rid: str, created: int, model: str, include_usage: bool) -> None:
        self.rid, self.created, self.model = rid, created, model
        self.include_usage = include_usage
        self._templates: dict[tuple[str, int], TextChunkTemplate] = {}

    def text_chunk(self, kind: str, index: int, text: str) -> str:
        """JSON of a plain text delta ('chat' or 'completion') for choice index (fast path)."""
        template = self._templates.get((kind, index))
        if template is None:
            sample = (self.chat_chunk(index, Delta(content=_SLOT), None) if kind == "chat"
                      else self.completion_chunk(index, _SLOT, None))
            template = self._templates[(kind, index)] = TextChunkTemplate(sample)
        return template.fill(text)

    # ---- completions ----
    def completion(self, choices: list[CompletionChoice], use: Usage) -> dict:
        """A whole text_completion."""
        return Completion(id=self.rid, created=self.created, model=self.model, choices=choices,
                          usage=use).wire()

    def completion_chunk(self, index: int, text: str, finish: str | None,
                         logprobs: CompletionLogprobs | None = None) -> dict:
        """One text_completion stream chunk."""
        choice = CompletionChoice(text=text, index=index, logprobs=logprobs, finish_reason=finish)
        chunk = Completion(id=self.rid, created=self.created, model=self.model, choices=[choice])
        if self.include_usage:
            chunk.usage = None
        return chunk.wire()

    def completion_usage_chunk(self, use: Usage) -> dict:
        """The final usage chunk of a completions stream."""
        return Completion(id=self.rid, created=self.created, model=self.model, choices=[],
                          usage=use).wire()

    # ---- chat ----
    def chat(self, choices: list[ChatChoice], use: Usage) -> dict:
        """A whole chat.completion."""
        return ChatCompletion(id=self.rid, created=self.created, model=self.model, choices=choices,
                              usage=use).wire()

    def chat_choice(self, index: int, text: str | None, finish: str, logprobs: ChatLogprobs | None,
                    calls: list[dict] | None = None, legacy: bool = False) -> ChatChoice:
        """One choice of a chat.completion; with calls (id, name, arguments): message.tool_calls and
        finish_reason "tool_calls" (legacy: message.function_call and "function_call")."""
        message = AssistantMessage(content=text, refusal=None)
        if calls and legacy:
            message.function_call = FunctionCall(name=calls[0]["name"], arguments=calls[0]["arguments"])
            finish = "function_call"
        elif calls:
            message.tool_calls = [ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"]))
                                  for c in calls]
            finish = "tool_calls"
        return ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish)

    def call_chunks(self, index: int, calls: list[dict], legacy: bool) -> list[dict]:
        """A choice's calls as stream chunks: per call, its id, type and name (arguments ""), then its
        arguments; then the finish chunk ("tool_calls"; legacy: function_call deltas and "function_call")."""
        if legacy:
            name = Delta(function_call=FunctionCallDelta(name=calls[0]["name"], arguments=""))
            arguments = Delta(function_call=FunctionCallDelta(arguments=calls[0]["arguments"]))
            return [self.chat_chunk(index, name, None), self.chat_chunk(index, arguments, None),
                    self.chat_chunk(index, Delta(), "function_call")]
        out = []
        for i, call in enumerate(calls):
            first = ToolCallDelta(index=i, id=call["id"], type="function",
                                  function=FunctionCallDelta(name=call["name"], arguments=""))
            rest = ToolCallDelta(index=i, function=FunctionCallDelta(arguments=call["arguments"]))
            out += [self.chat_chunk(index, Delta(tool_calls=[first]), None),
                    self.chat_chunk(index, Delta(tool_calls=[rest]), None)]
        return out + [self.chat_chunk(index, Delta(), "tool_calls")]

    def chat_chunk(self, index: int, delta: Delta, finish: str | None,
                   logprobs: ChatLogprobs | None = None) -> dict:
        """One chat.completion.chunk."""
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
        chunk = ChatCompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[choice])
        if self.include_usage:
            chunk.usage = None
        return chunk.wire()

    def chat_usage_chunk(self, use: Usage) -> dict:
        """The final usage chunk of a chat stream."""
        return ChatCompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[],
                                   usage=use).wire()
