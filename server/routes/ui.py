"""The built-in chat page (GET /) and its static files."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
