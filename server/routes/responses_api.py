"""The Responses API (/v1/responses): validate, call the responses service, return JSON or typed SSE."""

from __future__ import annotations

from contextlib import aclosing
from typing import Literal

from fastapi import APIRouter, Query, Request

from server.errors import JSONBody, unsupported
from server.protocol import ErrorResponse
from server.protocol.responses_api import CreateResponse, DeletedResponse, InputItemList, ResponseObject
from server.render import dumps
from server.responses.events import ResponseEvents
from server.responses.service import ResponsesService
from server.routes.common import StreamResponse, disconnect_waiter

router = APIRouter(prefix="/v1", default_response_class=JSONBody)


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


_SSE = ("With `\"stream\": true`, server-sent events, each `event: <type>` and `data: <JSON>` with an increasing "
        "`sequence_number`: response.created, response.in_progress, response.output_item.added, "
        "response.content_part.added, response.output_text.delta, ... .done, function_call_arguments.delta/.done "
        "for function calls, then one final event: response.completed, response.incomplete or response.failed; "
        "the last line is `data: [DONE]`.")
_NOT_FOUND = _error("No stored response with this id: unknown, expired, deleted or created with store: false.")
_AUTH = _error("No valid API key (`invalid_api_key`), when the server requires keys.")
_OTHER = _error("Any other error, in the same shape (e.g. 500 `internal_error`).")
_STORE = _error("The server cannot use its responses store (`store_unavailable`: the file is locked, damaged or "
                "read-only; the message says why).")


def _service(request: Request) -> ResponsesService:
    return request.app.state.responses


# OpenAI's query parameters of GET /responses/{id} (and .../input_items) that ask for what is not kept here
_INCLUDE_WHY = "there are no extra output data to include"
_RETRIEVE_QUERY = {"include": _INCLUDE_WHY, "include[]": _INCLUDE_WHY,
                   "starting_after": "a stored response is returned whole, not replayed as a stream",
                   "include_obfuscation": "a stored response is returned whole, not replayed as a stream"}


def _refuse_query(request: Request, names: tuple[str, ...]) -> None:
    """A 400 naming the first of OpenAI's query parameters `names` that is given (none is silently ignored)."""
    for name in names:
        value = request.query_params.get(name)
        if value in (None, "") or (name == "include_obfuscation" and value.lower() in ("false", "0")):
            continue
        raise unsupported(name.removesuffix("[]"), _RETRIEVE_QUERY[name])


async def _sse(stream: ResponseEvents):
    """Typed SSE events (`event:` and `data:` lines), then `data: [DONE]`."""
    async with aclosing(stream.events()) as events:
        async for kind, data in events:
            yield f"event: {kind}\r\ndata: {dumps(data)}\r\n\r\n".encode()
    yield b"data: [DONE]\r\n\r\n"


@router.post("/responses", responses={
    200: {"model": ResponseObject, "description": f"The response as JSON. {_SSE}",
          "content": {"text/event-stream": {"schema": {"type": "string", "description": _SSE}}}},
    400: _error("Invalid request: a wrong or unsupported field (`unknown_parameter`, `unsupported_parameter`, "
                "...; `param` names it), a conversation that does not fit the context "
                "(`context_length_exceeded`), or an unknown previous_response_id (`previous_response_not_found`)."),
    401: _AUTH,
    404: _error("Unknown model, or a registered model whose file is not downloaded (`model_not_found`)."),
    503: _error("Retry later (see Retry-After): queue full or timed out, model unavailable, or shutting down; or "
                "`store_unavailable` for a previous_response_id the store cannot read."),
    "default": _OTHER,
})
async def create_response(body: CreateResponse, request: Request):
    """Create a model response (text subset of OpenAI's Responses API; stored unless store is false)."""
    result = await _service(request).create(body, disconnect_waiter(request), request.state.record,
                                            getattr(request.app.state, "lifecycle", None))
    if isinstance(result, dict):
        return JSONBody(result)
    return StreamResponse(result, _sse(result), ping=15, send_timeout=None)


@router.get("/responses/{response_id}", responses={
    200: {"model": ResponseObject, "description": "The stored response."}, 401: _AUTH, 404: _NOT_FOUND, 503: _STORE,
    "default": _OTHER})
async def get_response(response_id: str, request: Request, stream: bool = False):
    """Retrieve a stored response (replaying it as a stream is not supported)."""
    if stream:
        raise unsupported("stream", "a stored response is returned whole")
    _refuse_query(request, tuple(_RETRIEVE_QUERY))
    return await _service(request).retrieve(response_id)


@router.delete("/responses/{response_id}", responses={
    200: {"model": DeletedResponse, "description": "The response was deleted."}, 401: _AUTH, 404: _NOT_FOUND, 503: _STORE,
    "default": _OTHER})
async def delete_response(response_id: str, request: Request):
    """Delete a stored response."""
    return await _service(request).delete(response_id)


@router.get("/responses/{response_id}/input_items", responses={
    200: {"model": InputItemList, "description": "The response's input items (a chain's history included)."},
    401: _AUTH, 404: _NOT_FOUND, 503: _STORE, "default": _OTHER})
async def list_input_items(response_id: str, request: Request, limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc", after: str | None = None):
    """List a stored response's input items (newest first unless order=asc)."""
    _refuse_query(request, ("include", "include[]"))
    return await _service(request).input_items(response_id, limit, order, after)
