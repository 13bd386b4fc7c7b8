"""The OpenAI endpoints: validate, call one service method, return JSON or an SSE stream."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from server.protocol import ChatCompletionRequest, CompletionRequest
from server.service import InferenceService

router = APIRouter(prefix="/v1")


def _service(request: Request) -> InferenceService:
    return request.app.state.service


def _disconnect_waiter(request: Request):
    """An awaitable factory that returns when the client disconnects."""

    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return wait


def _respond(result, request: Request) -> JSONResponse | EventSourceResponse:
    if isinstance(result, dict):
        return JSONResponse(result)
    grace = request.app.state.settings.shutdown_grace  # streams get to finish on SIGTERM, up to this
    return EventSourceResponse(_sse(result), ping=15, send_timeout=30, shutdown_grace_period=grace)


async def _sse(payloads):
    """Pre-encoded SSE events (`data: <json>` + blank line), so nothing is re-serialised per token."""
    async for data in payloads:
        yield f"data: {data}\r\n\r\n".encode()


@router.post("/completions")
async def create_completion(body: CompletionRequest, request: Request):
    """Create a text completion."""
    service = _service(request)
    return _respond(await service.completions(body, _disconnect_waiter(request), request.state.record), request)


@router.post("/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """Create a chat completion."""
    service = _service(request)
    return _respond(await service.chat(body, _disconnect_waiter(request), request.state.record), request)


@router.get("/models")
async def list_models(request: Request):
    """List the models that can be served now."""
    return _service(request).list_models()


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    """Describe one model."""
    return _service(request).get_model(model_id)
