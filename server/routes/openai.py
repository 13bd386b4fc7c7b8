"""The OpenAI endpoints: validate, call one service method, return JSON or an SSE stream."""

from __future__ import annotations

from contextlib import aclosing

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse
from sse_starlette.sse import AppStatus

from server.errors import JSONBody
from server.protocol import (
    ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ErrorResponse, ModelCard, ModelList,
)
from server.routes.common import StreamResponse, disconnect_waiter, inference, lifecycle

# sse-starlette would end every open stream itself as soon as uvicorn is told to exit (or after its own
# grace): mid-way, with no error event and no [DONE]. Streams here end through the shutdown lifecycle
# instead (server/lifecycle.py): they get the whole grace, then an error event and [DONE].
AppStatus.disable_automatic_graceful_drain()

router = APIRouter(prefix="/v1", default_response_class=JSONBody)


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


_SSE = ("With `\"stream\": true`, server-sent events: each `data: <JSON>` holds one {chunk} chunk (or an "
        "error object, after which the stream ends), and the last is `data: [DONE]`.")
_AUTH = _error("No valid API key (`invalid_api_key`), when the server requires keys.")
_OTHER = _error("Any other error, in the same shape (e.g. 500 `internal_error`).")
_GENERATION_ERRORS = {
    400: _error("Invalid request: a wrong field (`invalid_value`, `unknown_parameter`, ...), a parameter this "
                "server does not support (`unsupported_parameter`), a prompt and completion that do not fit "
                "the context (`context_length_exceeded`), or more generations than the model can take at "
                "once (`too_many_generations`)."),
    401: _AUTH,
    404: _error("Unknown model, or a registered model whose file is not downloaded (`model_not_found`)."),
    413: _error("The request body is larger than the server accepts (`request_too_large`)."),
    503: _error("Retry later (see Retry-After): the model's queue is full (`queue_full`) or the request waited "
                "too long in it (`queue_timeout`), the model is unavailable (`model_unavailable`), or the "
                "server is shutting down (`server_shutting_down`)."),
    "default": _OTHER,
}


def _generation_responses(whole: type, chunk: str) -> dict:
    """OpenAPI responses of a generation route: JSON or an event stream, and the real errors."""
    sse = _SSE.format(chunk=chunk)
    ok = {"model": whole, "description": f"The whole response as JSON. {sse}",
          "content": {"text/event-stream": {"schema": {"type": "string", "description": sse}}}}
    return {200: ok, **_GENERATION_ERRORS}


def _respond(result) -> JSONBody | EventSourceResponse:
    if isinstance(result, dict):
        return JSONBody(result)
    # no send timeout here: a client that does not read is handled by the HTTP layer (server/serve.py)
    return StreamResponse(result, _sse(result.events()), ping=15, send_timeout=None)


async def _sse(payloads):
    """Pre-encoded SSE events (`data: <json>` + blank line), so nothing is re-serialised per token.

    Closing this generator (a failed send) closes the stream's own at once, so its request ends."""
    async with aclosing(payloads):
        async for data in payloads:
            yield f"data: {data}\r\n\r\n".encode()


@router.post("/completions", responses=_generation_responses(Completion, "`text_completion`"))
async def create_completion(body: CompletionRequest, request: Request):
    """Create a text completion."""
    service = inference(request)
    return _respond(await service.completions(body, disconnect_waiter(request), request.state.record,
                                              lifecycle(request)))


@router.post("/chat/completions", responses=_generation_responses(ChatCompletion, "`chat.completion.chunk`"))
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """Create a chat completion."""
    service = inference(request)
    return _respond(await service.chat(body, disconnect_waiter(request), request.state.record,
                                       lifecycle(request)))


@router.get("/models", responses={200: {"model": ModelList, "description": "The served models."},
                                  401: _AUTH, "default": _OTHER})
async def list_models(request: Request):
    """List the models that can be served now."""
    return inference(request).list_models()


@router.get("/models/{model_id:path}", responses={
    200: {"model": ModelCard, "description": "The model."},
    401: _AUTH,
    404: _error("Unknown model, or a registered model whose file is not downloaded (`model_not_found`)."),
    503: _error("A registered model that could not be loaded (`model_unavailable`)."),
    "default": _OTHER,
})
async def get_model(model_id: str, request: Request):
    """Describe one model."""
    return inference(request).get_model(model_id, request.state.record)
