"""The Responses API (/v1/responses): validate, call the responses service, return JSON or typed SSE."""

from __future__ import annotations

from fastapi import APIRouter

from server.errors import JSONBody

router = APIRouter(prefix="/v1", default_response_class=JSONBody)
