"""What every route module needs from the request: the services, the disconnect waiter, the lifecycle."""

from __future__ import annotations

from fastapi import Request

from server.lifecycle import Lifecycle
from server.service import InferenceService


def inference(request: Request) -> InferenceService:
    """The app's inference service."""
    return request.app.state.service


def disconnect_waiter(request: Request):
    """An awaitable factory that returns when the client disconnects."""

    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return wait


def lifecycle(request: Request) -> Lifecycle | None:
    """The server's shutdown lifecycle (None in apps built without one)."""
    return getattr(request.app.state, "lifecycle", None)
