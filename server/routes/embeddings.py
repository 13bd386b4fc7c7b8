"""POST /v1/embeddings: validate, call the embedding service, return JSON."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.embeddings import body_bytes
from server.errors import JSONBody
from server.protocol import ErrorResponse
from server.protocol.embeddings import EmbeddingList, EmbeddingRequest
from server.routes.common import disconnect_waiter, inference, lifecycle

router = APIRouter(prefix="/v1", default_response_class=JSONBody)


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


_RESPONSES = {
    200: {"model": EmbeddingList, "description": "One vector per input, in input order: the mean of the input's "
                                                  "final hidden states (after GPT-J's final layer norm), "
                                                  "L2-normalised; base64 = little-endian float32 bytes."},
    400: _error("Invalid request: an empty input (`invalid_value`), more inputs than `max_embedding_inputs` "
                "(`too_many_inputs`), a token id outside the vocabulary (`invalid_value`), an input longer than "
                "the context (`context_length_exceeded`), `dimensions` other than the model's "
                "(`invalid_value`), an unknown field (`unknown_parameter`), or a model whose engine cannot "
                "embed (`unsupported_engine`: use `engine: ggml`)."),
    401: _error("No valid API key (`invalid_api_key`), when the server requires keys."),
    404: _error("Unknown model, or a registered model whose file is not downloaded (`model_not_found`)."),
    413: _error("The request body is larger than the server accepts (`request_too_large`)."),
    503: _error("Retry later (see Retry-After): the model's queue is full (`queue_full`) or the request waited "
                "too long in it (`queue_timeout`), the model is unavailable (`model_unavailable`), or the "
                "server is shutting down (`server_shutting_down`)."),
    "default": _error("Any other error, in the same shape (e.g. 500 `internal_error`)."),
}


@router.post("/embeddings", responses=_RESPONSES)
async def create_embeddings(body: EmbeddingRequest, request: Request):
    """Create embeddings of texts or token ids with a served model."""
    result = await inference(request).embeddings(body, disconnect_waiter(request), request.state.record,
                                                lifecycle(request))
    return Response(await body_bytes(result), media_type="application/json")
