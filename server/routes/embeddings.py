"""POST /v1/embeddings: validate, call the embedding service, return JSON."""

from __future__ import annotations

from fastapi import APIRouter

from server.errors import JSONBody

router = APIRouter(prefix="/v1", default_response_class=JSONBody)
