"""OpenAI's Responses API on the wire: the request (text subset) and the response object's parts."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FormatText(_Strict):
    """Plain text (the default)."""

    type: Literal["text"]


class FormatJsonObject(_Strict):
    """JSON mode: the reply is one JSON object."""

    type: Literal["json_object"]


class FormatJsonSchema(_Strict):
    """Structured outputs: the reply follows `schema`."""

    type: Literal["json_schema"]
    name: str = Field(pattern=_NAME)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class OtherFormat(BaseModel):
    """Any other text.format type: recognised only to be refused by name (text.format.type)."""

    model_config = ConfigDict(extra="allow")
    type: Any = None


_FORMAT_TAGS = {"text": "text-format", "json_object": "json-object-format", "json_schema": "json-schema-format"}


def _format_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return _FORMAT_TAGS.get(kind, "other-format") if isinstance(kind, str) else "other-format"


# tags with "-": left out of error params (text.format.name, not text.format.json_schema.name)
TextFormat = Annotated[
    Annotated[FormatText, Tag("text-format")] | Annotated[FormatJsonObject, Tag("json-object-format")]
    | Annotated[FormatJsonSchema, Tag("json-schema-format")] | Annotated[OtherFormat, Tag("other-format")],
    Discriminator(_format_kind)]


class TextParam(_Strict):
    """`text`: the output's format (verbosity is only accepted as the default, medium)."""

    format: TextFormat | None = None
    verbosity: str | None = None


class FunctionTool(_Strict):
    """A function tool in the Responses' flat shape."""

    type: Literal["function"]
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class OtherTool(BaseModel):
    """A built-in tool (web_search, file_search, ...): recognised only to be refused by name."""

    model_config = ConfigDict(extra="allow")
    type: Any = None


def _tool_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "function-tool" if kind == "function" else "other-tool"  # tags with "-": left out of error params


AnyTool = Annotated[Annotated[FunctionTool, Tag("function-tool")] | Annotated[OtherTool, Tag("other-tool")],
                    Discriminator(_tool_kind)]


class ToolChoiceFunction(_Strict):
    """`tool_choice` that forces one function."""

    type: Literal["function"]
    name: str


class StreamOptions(_Strict):
    """Options of a streamed response."""

    include_obfuscation: bool | None = None


class CreateResponse(_Strict):
    """POST /v1/responses (text in, text or function calls out)."""

    model: str = Field(description="Model id or alias from the registry.")
    input: str | list[dict[str, Any]] | None = Field(
        None, description="A string (one user message) or a list of items: messages (role user, system, "
                          "developer or assistant; content a string or input_text/output_text parts), "
                          "function_call and function_call_output items.")
    instructions: str | None = Field(None, description="A system message put first (not carried over by "
                                                       "previous_response_id).")
    max_output_tokens: int | None = Field(None, ge=16)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    text: TextParam | None = None
    tools: list[AnyTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = True
    previous_response_id: str | None = None
    user: str | None = None
    safety_identifier: str | None = Field(None, max_length=64)
    # OpenAI fields accepted only with a value that asks for nothing special (see server/responses/translate.py)
    background: bool | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    truncation: str | None = None
    service_tier: str | None = None
    prompt: Any | None = None
    conversation: Any | None = None
    context_management: Any | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    moderation: Any | None = None


class OutputText(BaseModel):
    """Generated text in a message item."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(BaseModel):
    """The assistant's message item (`msg_...`)."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    """A function call item (`fc_...`); `call_id` is what the function_call_output answers."""

    id: str
    type: Literal["function_call"] = "function_call"
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str
    name: str
    arguments: str


class InputTokensDetails(BaseModel):
    """Input tokens reused from the prefix cache (none are written to a cache by request)."""

    cached_tokens: int
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    """These models do not reason: always 0."""

    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    """Token counts of a response."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class ResponseError(BaseModel):
    """Why a response failed."""

    code: str
    message: str


class IncompleteDetails(BaseModel):
    """Why a response is incomplete."""

    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    """A response (`resp_...`), with the request's parameters echoed."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputMessage | FunctionCallItem] = []
    usage: ResponseUsage | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] = []
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = {"format": {"type": "text"}}
    metadata: dict[str, str] = {}
    store: bool = True
    previous_response_id: str | None = None
    user: str | None = None
    background: bool = False
    truncation: str = "disabled"
    service_tier: str = "default"
    reasoning: dict[str, Any] | None = None


class DeletedResponse(BaseModel):
    """DELETE /v1/responses/{id}."""

    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class InputItemList(BaseModel):
    """GET /v1/responses/{id}/input_items."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
