"""Pure ASGI middleware: request id, body size cap, API keys, access log and request metrics."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from urllib.parse import quote
from dataclasses import dataclass, field

from server.errors import error_body

access_log = logging.getLogger("gpt4all_j_server.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/embeddings", "/v1/responses", "/health",
           "/ready", "/metrics", "/docs", "/redoc", "/openapi.json", "/"}
_NO_BODY = {"GET", "HEAD", "OPTIONS"}  # no route reads a body for these: none is read or buffered


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
    key_ok: bool | None = None  # a valid API key was sent; None when no keys are configured


def route_label(path: str) -> str:
    """A low-cardinality route name for metrics."""
    if path in _ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model_id}"
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{response_id}"
    if path.startswith("/docs-assets/"):
        return "/docs-assets/{file}"
    if path.startswith("/ui/"):
        return "/ui/{file}"
    return "other"


_GONE = object()  # marker: the request body never arrived whole, so the app is not called


class RequestContext:
    """Wraps every HTTP request: id, key check, body cap, then access log and metrics.

    `open_paths` are served without a key; an entry ending in "/" opens every path below it, except "/"
    itself, which opens the root path alone (else it would open every path).
    """

    def __init__(self, app, *, keys: list[str], open_paths: set[str], max_body: int, metrics,
                 log_requests: bool) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = {p for p in open_paths if not p.endswith("/") or p == "/"}
        self.open_prefixes = tuple(p for p in open_paths if p.endswith("/") and p != "/")
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
            problem = self._refuse(scope, headers, record)
            if problem is None:
                replay = _no_body(receive) if scope["method"] in _NO_BODY else await self._read_body(receive)
                if replay is None:
                    problem = (413, f"The request body is larger than {self.max_body} bytes.",
                               "request_too_large")
            if problem is not None:
                await self._error(send_wrapper, *problem)
            elif replay is _GONE:  # the body never came whole (client gone, or the edge's body timeout)
                record.outcome = "client_gone"
            else:
                await self.app(scope, replay, send_wrapper)
        finally:
            self._finish(scope, record)

    def _refuse(self, scope, headers: dict[str, str], record: RequestRecord) -> tuple[int, str, str] | None:
        """401 without a valid key (where keys are required), 413 for a declared oversize body.

        Every method needs a key, OPTIONS too: CORS preflights are answered by the CORS middleware
        outside this one and never get here.
        """
        if self.keys:
            record.key_ok = self._key_ok(headers.get("authorization", ""))
            if not record.key_ok and not self._is_open(scope["path"]):
                return (401, "Incorrect API key provided. Pass a key in the Authorization header as "
                             "'Bearer <key>'.", "invalid_api_key")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return 413, f"The request body is larger than {self.max_body} bytes.", "request_too_large"
        return None

    def _key_ok(self, auth: str) -> bool:
        """Whether an Authorization header carries one of the keys."""
        token = auth[7:].strip().encode("latin-1") if auth[:7].lower() == "bearer " else b""
        ok = False
        for key in self.keys:  # compare with every key: time does not depend on which matched
            ok |= hmac.compare_digest(token, key)
        return ok

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(self.open_prefixes)

    async def _read_body(self, receive):
        """Read the whole body (at most max_body bytes); a receive that replays it, or None if too big."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return _GONE  # the client went away (or timed out) before its body was complete
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return None
            chunks.append(body)
            more = message.get("more_body", False)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return replay

    async def _error(self, send, status: int, message: str, code: str) -> None:
        kind = "invalid_request_error"
        body = json.dumps(error_body(message, kind, None, code)).encode()
        if self.metrics is not None:
            self.metrics.rejected.labels(reason=code).inc()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
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
                '%s %s "%s %s" %s model=%s prompt_tokens=%d completion_tokens=%d ttft_ms=%s duration_ms=%.1f '
                'outcome=%s',
                record.request_id, client[0], scope["method"], log_path(scope), status, record.model or "-",
                record.prompt_tokens, record.completion_tokens, ttft, duration * 1000, record.outcome or "-",
            )


def log_path(scope) -> str:
    """The request path as sent, percent-encoded: no quote, space or control character can split a log field."""
    raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    return quote(raw, safe="/:@!$&'()*+,;=-._~%")


def _no_body(receive):
    """A receive for a request whose body is never read: an empty body, then the client's own messages."""
    pending = [{"type": "http.request", "body": b"", "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay
