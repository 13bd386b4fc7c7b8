"""Pure ASGI middleware: request id, body size cap, API keys, access log and request metrics."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from server.errors import error_body

access_log = logging.getLogger("gpt4all_j_server.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics"}


@dataclass
class RequestRecord:
    """What one request did, filled in by the service, written to the access log at the end."""

    request_id: str
    started: float = field(default_factory=time.monotonic)
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None
    status: int = 0
    outcome: str | None = None  # how a generation ended: done, error:<code>, client_gone, cut:<why>


def route_label(path: str) -> str:
    """A low-cardinality route name for metrics."""
    if path in _ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model_id}"
    return "other"


class RequestContext:
    """Wraps every HTTP request: id, key check, body cap, then access log and metrics."""

    def __init__(self, app, *, keys: list[str], open_paths: set[str], max_body: int, metrics,
                 log_requests: bool) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = open_paths
        self.max_body = max_body
        self.metrics = metrics
        self.log_requests = log_requests

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        record = RequestRecord(given if _REQUEST_ID.match(given) else uuid.uuid4().hex)
        scope.setdefault("state", {})["record"] = record

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", record.request_id.encode())]
            await send(message)

        try:
            problem = self._refuse(scope, headers)
            if problem is None:
                replay = await self._read_body(receive)
                if replay is None:
                    problem = (413, f"The request body is larger than {self.max_body} bytes.",
                               "request_too_large")
            if problem is not None:
                await self._error(send_wrapper, *problem)
            else:
                await self.app(scope, replay, send_wrapper)
        finally:
            self._finish(scope, record)

    def _refuse(self, scope, headers: dict[str, str]) -> tuple[int, str, str] | None:
        """401 without a valid key (where keys are required), 413 for a declared oversize body."""
        if self.keys and scope["path"] not in self.open_paths and scope["method"] != "OPTIONS":
            auth = headers.get("authorization", "")
            token = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
            ok = False
            for key in self.keys:  # compare with every key: time does not depend on which matched
                ok |= hmac.compare_digest(token, key)
            if not ok:
                return (401, "Incorrect API key provided. Pass a key in the Authorization header as "
                             "'Bearer <key>'.", "invalid_api_key")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return 413, f"The request body is larger than {self.max_body} bytes.", "request_too_large"
        return None

    async def _read_body(self, receive):
        """Read the whole body (at most max_body bytes); a receive that replays it, or None if too big."""
        chunks, size, more = [], 0, True
        first = None
        while more:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # the client went away: let the app see it
                break
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return None
            chunks.append(body)
            more = message.get("more_body", False)
        pending = [first or {"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return replay

    async def _error(self, send, status: int, message: str, code: str) -> None:
        kind = "invalid_request_error"
        body = json.dumps(error_body(message, kind, None, code)).encode()
        if self.metrics is not None:
            self.metrics.rejected.labels(reason=code).inc()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _finish(self, scope, record: RequestRecord) -> None:
        """Count the request and write its access log line."""
        duration = time.monotonic() - record.started
        route = route_label(scope["path"])
        status = record.status or 499  # no response: the client went away first
        if self.metrics is not None:
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.latency.labels(route=route).observe(duration)
        if self.log_requests:
            client = scope.get("client") or ("-", 0)
            ttft = f"{record.ttft * 1000:.1f}" if record.ttft is not None else "-"
            access_log.info(
                '%s %s "%s %s" %s model=%s prompt_tokens=%d completion_tokens=%d ttft_ms=%s duration_ms=%.1f',
                record.request_id, client[0], scope["method"], scope["path"], status, record.model or "-",
                record.prompt_tokens, record.completion_tokens, ttft, duration * 1000,
            )
