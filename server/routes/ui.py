"""The built-in chat page (GET /) and its static files (GET /ui/<file>), served from the package.

The files hold no data, so they are open without an API key (server.security.open_paths); the page asks for
a key and sends it with its API calls. With --no-ui both answer 404 like any unknown route.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

router = APIRouter(include_in_schema=False)

UI_PREFIX = "/ui/"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# no inline script or style, nothing from another origin, never framed
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


@cache
def ui_files() -> dict[str, bytes]:
    """The page's files by name (index.html, app.js, ...), read from the package once."""
    folder = resources.files("server") / "ui"
    return {item.name: item.read_bytes() for item in folder.iterdir()
            if item.is_file() and _suffix(item.name) in _TYPES}


@cache
def etag(name: str) -> str:
    """A strong validator of one file: a browser revalidates it (no-cache) and gets a 304 when unchanged."""
    return '"' + hashlib.sha256(ui_files()[name]).hexdigest()[:32] + '"'


def _suffix(name: str) -> str:
    return name[name.rfind("."):] if "." in name else ""


def _serve(request: Request, name: str) -> Response:
    """One file with the security headers and its ETag (304 when the browser's copy is current); 404 (as an
    unknown URL) when the page is off or the file unknown."""
    if not request.app.state.settings.ui:
        raise StarletteHTTPException(404)
    body = ui_files().get(name)
    if body is None:
        raise StarletteHTTPException(404)
    headers = {**HEADERS, "ETag": etag(name)}
    listed = _listed(request.headers.get("if-none-match", ""))
    if headers["ETag"] in listed or "*" in listed:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=_TYPES[_suffix(name)], headers=headers)


def _listed(header: str) -> set[str]:
    """The entity tags of an If-None-Match header (weak ones compared as strong, as RFC 9110 asks here)."""
    return {t.strip().removeprefix("W/") for t in header.split(",") if t.strip()}


@router.get("/")
@router.head("/")
async def chat_page(request: Request) -> Response:
    """The chat page."""
    return _serve(request, "index.html")


@router.get(UI_PREFIX + "{name}")
@router.head(UI_PREFIX + "{name}")
async def ui_file(name: str, request: Request) -> Response:
    """A file of the chat page (script, style sheet, icon)."""
    return _serve(request, name)
