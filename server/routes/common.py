"""What every route module needs from the request: the services, the disconnect waiter, the lifecycle."""

from __future__ import annotations

from fastapi import Request
from sse_starlette import EventSourceResponse

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


class StreamResponse(EventSourceResponse):
    """An SSE response that ends its request however the response ends: sent, failed or cancelled, and
    also when its body never started (the stream's `close` is idempotent)."""

    def __init__(self, stream, content, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close()
