"""One error body everywhere: {"error": {"message", "type", "param", "code"}} with OpenAI's strings."""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error that is sent to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        """The JSON body."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, why: str = "") -> APIError:
    """400 for an OpenAI parameter this server does not implement."""
    msg = f"The parameter `{param}` is not supported by this server" + (f": {why}" if why else ".")
    return APIError(400, msg, param=param, code="unsupported_parameter")


def shorten(text: str, limit: int = 200) -> str:
    """Client text quoted in a message, cut to `limit` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def model_not_found(name: str) -> APIError:
    """404 model_not_found, worded like OpenAI."""
    return APIError(404, f"The model `{shorten(name)}` does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


def model_not_downloaded(model_id: str, reason: str) -> APIError:
    """404 model_not_found (what SDKs expect) for a registered model whose file is not on the server.

    reason completes "The model `ID` is ...", e.g. "registered but not downloaded: run `... pull ID` ..."."""
    return APIError(404, f"The model `{model_id}` is {reason}.", param="model", code="model_not_found")


def model_unavailable(model_id: str, reason: str, retry_after: int) -> APIError:
    """503 model_unavailable for a registered model that cannot be served (reason completes "... is ")."""
    return APIError(503, f"The model `{model_id}` is {reason}.", type="server_error", param="model",
                    code="model_unavailable", headers={"Retry-After": str(retry_after)})


def response_not_found(response_id: str) -> APIError:
    """404 for a stored response that is unknown, expired, deleted or was never stored (store: false)."""
    return APIError(404, f"Response with id '{shorten(response_id, 100)}' not found.", code="not_found")


def internal_error() -> APIError:
    """500 internal_error: a failure of the server itself (the details go to the log, not the client)."""
    return APIError(500, "The server had an error while processing your request.", type="server_error",
                    code="internal_error")


def shutting_down(retry_after: int) -> APIError:
    """503 server_shutting_down: no new generations while the server drains, and the end of running ones."""
    return APIError(503, "The server is shutting down and cannot finish this request. Retry it, on another "
                         "instance if there is one.", type="server_error", code="server_shutting_down",
                    headers={"Retry-After": str(retry_after)})


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def json_text(content: object) -> str:
    """JSON that every client can parse: NaN and infinities raise ValueError; a lone surrogate (which
    UTF-8 cannot encode) is written as the text `\\udXXX`, so echoing client text never fails."""
    text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    if text.isascii() or _LONE_SURROGATE.search(text) is None:
        return text
    return _LONE_SURROGATE.sub(lambda m: f"\\\\u{ord(m.group()):04x}", text)


class JSONBody(JSONResponse):
    """The JSON response class of every API answer: always valid, always encodable (see json_text)."""

    def render(self, content: object) -> bytes:
        return json_text(content).encode("utf-8")


_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|[\[\-]")


def param_name(loc: tuple) -> str | None:
    """A request field path like messages[0].content (or a query parameter's name, like limit), without
    pydantic's union-member tags."""
    out = ""
    for i, part in enumerate(loc):
        if i == 0 and part in ("body", "query", "path"):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.search(str(part)):
            out += ("." if out else "") + shorten(str(part), 100)
    return out or None


def _validation_message(err: dict) -> tuple[str, str | None, str]:
    """Message, param and code for one pydantic/FastAPI validation error."""
    param = param_name(tuple(err.get("loc", ())))
    kind = err.get("type", "invalid")
    if kind == "json_invalid":
        return ("We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                "using your HTTP library correctly. The OpenAI API expects a JSON payload.)", None,
                "invalid_json")
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param, "unknown_parameter"
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    msg = err.get("msg", "invalid value")
    return f"Invalid value for '{param}': {msg}." if param else f"Invalid request: {msg}.", param, "invalid_value"


def _count(req: Request, reason: str | None) -> None:
    metrics = getattr(req.app.state, "metrics", None)
    if metrics is not None:
        metrics.rejected.labels(reason=reason or "invalid_request").inc()


async def _api_error(req: Request, exc: APIError) -> JSONBody:
    if exc.status < 500 or exc.status == 503:
        _count(req, exc.code)
    return JSONBody(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(req: Request, exc: RequestValidationError) -> JSONBody:
    errors = exc.errors()
    first = errors[0] if errors else {"type": "invalid", "loc": ("body",), "msg": "invalid request"}
    message, param, code = _validation_message(first)
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        message, code = "The request body is empty; a JSON object is required.", "missing_body"
    _count(req, "invalid_request")
    return JSONBody(error_body(message, "invalid_request_error", param, code), status_code=400)


async def _http_error(req: Request, exc: StarletteHTTPException) -> JSONBody:
    if exc.status_code == 404:
        message, code = f"Unknown request URL: {req.method} {req.url.path}.", "unknown_url"
    elif exc.status_code == 400:
        message, code = f"The request body could not be parsed: {exc.detail}.", "invalid_body"
    elif exc.status_code == 405:
        message, code = f"Method {req.method} is not allowed for {req.url.path}.", "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONBody(error_body(message, kind, None, code), status_code=exc.status_code,
                    headers=getattr(exc, "headers", None))


async def _internal_error(_req: Request, exc: Exception) -> JSONBody:
    log.exception("unhandled error", exc_info=exc)
    return JSONBody(error_body("The server had an error while processing your request.",
                               "server_error", None, "internal_error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Route every kind of failure through the OpenAI error body."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
