"""OpenAI request bodies (the wire format), with this server's documented extensions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, WithJsonSchema, field_validator

_PROMPT_SHAPES = str | list[str] | list[int] | list[list[int]]


def _prompt_shape(value: Any) -> str | None:
    """Which of the four prompt shapes a value can only be, from its first item (None: none of them).

    Validating one shape instead of trying all four keeps a list of millions of ids cheap: a union
    would first validate every id as a string, and record an error for each."""
    if isinstance(value, str):
        return "str"
    if not isinstance(value, list):
        return None
    first = value[0] if value else ""
    if isinstance(first, list):
        return "list[list[int]]"
    number = isinstance(first, (int, float)) and not isinstance(first, bool)
    return "list[int]" if number else "list[str]"


Prompt = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[str], Tag("list[str]")] | Annotated[list[int], Tag("list[int]")]
    | Annotated[list[list[int]], Tag("list[list[int]]")],
    Discriminator(_prompt_shape, custom_error_type="invalid_union",
                  custom_error_message="Input should be a string, an array of strings, an array of token ids "
                                       "or an array of token-id arrays"),
    WithJsonSchema(TypeAdapter(_PROMPT_SHAPES).json_schema()),
]


class _Request(BaseModel):
    # strict: JSON types must match (no "4" for 4, no true for 1), as OpenAI validates them
    model_config = ConfigDict(extra="forbid", strict=True)


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:40] + "..."


class StreamOptions(_Request):
    """Options of a streamed response."""

    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class _Sampling(_Request):
    """Fields shared by completions and chat completions."""

    model: str = Field(description="Model id or alias from the registry.")
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None
    max_tokens: int | None = Field(None, ge=0)
    n: int | None = Field(1, ge=1, le=128)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    user: str | None = None
    # extensions (as in llama-cpp-python and vLLM)
    top_k: int | None = Field(None, ge=0, description="Extension: top-k cut-off, 0 disables it.")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="Extension: engine repetition penalty.")

    @field_validator("stop")
    @classmethod
    def _stop_limit(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        for key, bias in (v or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys must be token ids, got {_short(key)!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {_short(key)} must be between -100 and 100")
        return v


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Prompt | None = "<|endoftext|>"
    best_of: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None


class TextPart(BaseModel):
    """One part of a message's content; only text parts are supported."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class FunctionCallMade(BaseModel):
    """A function call in an assistant message of the history: its name and JSON-encoded arguments."""

    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    arguments: str


class MessageToolCall(BaseModel):
    """A tool call in an assistant message of the history."""

    model_config = ConfigDict(extra="ignore", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallMade


class ChatMessage(BaseModel):
    """A message in the conversation."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None

    @field_validator("content")
    @classmethod
    def _parts_not_empty(cls, v: str | list[TextPart] | None) -> str | list[TextPart] | None:
        if isinstance(v, list) and not v:
            raise ValueError("an array of content parts must not be empty")
        return v
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCallMade | None = None
    audio: Any | None = None


class ResponseFormatText(BaseModel):
    """Plain text (the default)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]


class ResponseFormatJsonObject(BaseModel):
    """JSON mode: the reply is one JSON object."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["json_object"]


class JsonSchemaFormat(BaseModel):
    """A named JSON Schema the reply must follow."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatJsonSchema(BaseModel):
    """Structured outputs: the reply is valid against `json_schema.schema`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
                           Field(discriminator="type")]


_TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(BaseModel):
    """A function the model may call: name, description and a JSON Schema of its arguments."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=_TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    """A tool in `tools` (only functions exist)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    """A function named by `tool_choice` or `function_call`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice` that forces one function."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None  # enforced by constrained decoding (server/structured.py)
    # tool calling, enforced by constrained decoding (server/tools.py)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = Field(None, max_length=128)
    function_call: Literal["none", "auto"] | FunctionName | None = None
    # accepted only with values that mean "nothing special" (see server/params.py)
    modalities: list[str] | None = None
    audio: Any | None = None
    prediction: Any | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = Field(None, max_length=64)
    prompt_cache_key: str | None = None
    web_search_options: Any | None = None
