"""The chat page over HTTP: security headers, open without a key (and nothing else opened), --no-ui;
and /docs and /redoc rendering in the browser with no network access."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.browser.conftest import _registry
from tests.browser.helpers import TIMEOUT_MS
from tests.e2e.conftest import serve_registry

FILES = {"/": "text/html", "/ui/app.js": "text/javascript", "/ui/api.js": "text/javascript",
         "/ui/style.css": "text/css", "/ui/icon.svg": "image/svg+xml"}


@pytest.fixture(scope="module")
def no_ui_server(chat_models, tmp_path_factory):
    yield from serve_registry(_registry(chat_models, ("coder",)), tmp_path_factory.mktemp("no-ui"),
                              {"GPT4ALL_J_UI": "false"})


def test_page_files_carry_security_headers(chat_server):
    for path, kind in FILES.items():
        r = httpx.get(chat_server.base + path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith(kind), path
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "http" not in csp
    assert httpx.head(chat_server.base + "/").status_code == 200
    page = httpx.get(chat_server.base + "/").text
    assert "<script>" not in page and " style=" not in page and "http" not in page  # nothing inline, nothing remote


def test_unknown_page_file_is_404(chat_server):
    for path in ("/ui/nope.js", "/ui/", "/ui/index.py"):
        r = httpx.get(chat_server.base + path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url", path


def test_page_is_open_without_a_key_and_nothing_else_is(keyed_server):
    for path in FILES:
        assert httpx.get(keyed_server.base + path).status_code == 200, path
    # "/" opens the root alone, not every path below it
    for path in ("/v1/models", "/nothing-here", "/uix", "/docs"):
        r = httpx.get(keyed_server.base + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    r = httpx.post(keyed_server.base + "/v1/chat/completions", json={"model": "coder", "messages": []})
    assert r.status_code == 401
    # a path that starts like the page's files but is not one of them is never served without a key
    host, port = keyed_server.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /ui/../v1/models HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        answer = s.recv(200)
    assert answer.startswith((b"HTTP/1.1 404", b"HTTP/1.1 401")), answer
    assert "open without a key: /, /health, /metrics, /ready, /ui/*" in keyed_server.logs()


def test_no_ui_answers_404_like_any_unknown_route(no_ui_server):
    unknown = httpx.get(no_ui_server.base + "/nothing-here")
    for path in FILES:
        r = httpx.get(no_ui_server.base + path)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == unknown.json()["error"]["code"] == "unknown_url"
        assert "content-security-policy" not in r.headers


def test_swagger_ui_renders_offline(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/docs")
    page = tab.page
    page.locator(".swagger-ui .info .title").wait_for(timeout=TIMEOUT_MS)
    assert "gpt4all-j-server" in page.locator(".swagger-ui .info .title").inner_text()
    assert "Authorization: Bearer" in page.locator(".swagger-ui .info").inner_text()
    page.get_by_role("button", name="Authorize").first.wait_for(timeout=TIMEOUT_MS)
    page.locator(".opblock-summary-path", has_text="/v1/chat/completions").first.wait_for(timeout=TIMEOUT_MS)
    assert tab.external == [] and tab.errors == []


def test_redoc_renders_offline(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/redoc")
    page = tab.page
    page.get_by_role("heading", name="gpt4all-j-server").first.wait_for(timeout=TIMEOUT_MS)
    page.get_by_text("Authorization: Bearer <key>").first.wait_for(timeout=TIMEOUT_MS)
    page.get_by_text("Create a chat completion").first.wait_for(timeout=TIMEOUT_MS)
    assert tab.external == [] and tab.errors == []


def test_page_files_revalidate_with_an_etag(chat_server):
    """no-cache makes the browser ask each time; the ETag lets the answer be an empty 304."""
    for path in FILES:
        r = httpx.get(chat_server.base + path)
        tag = r.headers["etag"]
        assert r.headers["cache-control"] == "no-cache" and tag.startswith('"'), path
        again = httpx.get(chat_server.base + path, headers={"If-None-Match": f'"other", W/{tag}'})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tag, path
        assert "content-security-policy" in again.headers
        assert httpx.get(chat_server.base + path, headers={"If-None-Match": '"other"'}).status_code == 200


def test_head_answers_the_headers_without_the_body(chat_server):
    host, port = chat_server.base.removeprefix("http://").split(":")
    get = httpx.get(chat_server.base + "/ui/app.js")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"HEAD /ui/app.js HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b"", answer[:300]
    assert f"content-length: {len(get.content)}".encode() in head.lower()
    assert get.headers["etag"].encode() in head


@pytest.mark.parametrize("path", [
    "/ui/..%2Fsettings.py", "/ui/%2e%2e%2fsettings.py", "/ui/..%5Csettings.py", "/ui/..%2F..%2Fpyproject.toml",
    "/ui/%2e%2e/routes/ui.py", "/ui/app.js%00.py", "/ui//app.js", "/ui/APP.JS", "/ui/.%2Fapp.js",
])
def test_no_path_reaches_outside_the_page_files(keyed_server, path):
    """Only the page's own files, by exact name: no traversal, no other file of the package, no key leak."""
    host, port = keyed_server.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith((b"HTTP/1.1 404", b"HTTP/1.1 401", b"HTTP/1.1 400")), answer[:200]
    assert b"import " not in answer and b"[project]" not in answer
