"""OpenAI response bodies and stream chunks. Dump with `wire()` so unset optional fields are omitted."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class _Response(BaseModel):
    _CONSTANTS = ("object", "role", "type")  # fixed-value fields that are always sent

    def model_post_init(self, _context: Any) -> None:
        for name in self._CONSTANTS:
            field = type(self).model_fields.get(name)
            if field is not None and field.default is not None:
                self.__pydantic_fields_set__.add(name)

    def wire(self) -> dict[str, Any]:
        """JSON-ready dict: fields explicitly set (even to null) are kept, unset optional ones dropped."""
        return self.model_dump(mode="json", exclude_unset=True)


class PromptTokensDetails(_Response):
    """Breakdown of the prompt tokens."""

    cached_tokens: int  # reused from a worker's previous sequence (prefix cache)


class Usage(_Response):
    """Token counts for a whole request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(_Response):
    """Legacy completions logprobs."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    """One choice of a completion (also used in its stream chunks)."""

    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "content_filter"] | None


class Completion(_Response):
    """A text_completion object or stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(_Response):
    """An alternative token in chat logprobs."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(_Response):
    """A generated token in chat logprobs."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    """Chat choice logprobs."""

    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None


class FunctionCall(_Response):
    """A call's function: its name and arguments as a JSON string."""

    name: str
    arguments: str


class ToolCall(_Response):
    """A tool call in a reply."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Response):
    """The assistant's reply."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None  # the legacy `functions` shape


class ChatChoice(_Response):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class ChatCompletion(_Response):
    """A chat.completion object."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class FunctionCallDelta(_Response):
    """A piece of a call's function in a stream chunk."""

    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Response):
    """A piece of tool call `index` in a stream chunk (id, type and name come on its first piece)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class Delta(_Response):
    """The increment in a chat stream chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionCallDelta | None = None  # the legacy `functions` shape


class ChatChunkChoice(_Response):
    """One choice in a chat stream chunk."""

    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"] | None


class ChatCompletionChunk(_Response):
    """A chat.completion.chunk object."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class EmbeddingInfo(_Response):
    """How a model's /v1/embeddings vectors are made: the mean over the input's tokens of GPT-J's final hidden
    states (after the final layer norm ln_f, before lm_head), L2-normalised."""

    dimensions: int
    pooling: Literal["mean"] = "mean"
    normalized: bool = True
    _CONSTANTS = ("object", "role", "type", "pooling", "normalized")


class ModelCard(_Response):
    """An entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    embedding: EmbeddingInfo | None = None  # extension: null when the model's engine cannot embed


class ModelList(_Response):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class Error(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error answer: {"error": {...}} (also sent as an event inside a stream)."""

    error: Error
