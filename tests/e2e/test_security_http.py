"""Security at the HTTP level: what /ready tells whom, HEAD, OPTIONS, CORS on refusals, offline docs."""

from __future__ import annotations

import re
import socket

import httpx
import pytest

from tests.e2e.conftest import start_server, stop_server

KEY, FILE_KEY, ORIGIN = "sk-one", "sk-two", "https://app.example"

# succ is served; absent is registered but not downloaded; shadow names a file that is not a model,
# whose first bytes the inspector quotes ("bad magic b'root'"): only trusted callers may see that
REGISTRY = """
models:
  - id: succ
    path: {succ}
    prompt_template: plain
    sampling: {{temperature: 0}}
    workers: 1
  - id: absent
    path: {missing}
    url: http://127.0.0.1:9/absent.bin
  - id: shadow
    path: {secret}
"""
PUBLIC = {"status": "ready", "models": {"succ": {"state": "ready"}, "absent": {"state": "not_downloaded"},
                                        "shadow": {"state": "skipped"}}}


def _registry(model_files, d):
    secret = d / "shadow"
    secret.write_text("root:$6$hash:19000:0:99999:7:::\n")
    registry = d / "registry.yaml"
    registry.write_text(REGISTRY.format(succ=model_files["succ"], missing=model_files["missing"], secret=secret))
    return registry


@pytest.fixture(scope="module")
def open_srv(model_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("sec-open")
    srv = start_server(_registry(model_files, d), d / "server.log")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def keyed(model_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("sec-keyed")
    keyfile = d / "keys"
    keyfile.write_text(f"# keys\n{FILE_KEY}\n")
    env = {"GPT4ALL_J_API_KEYS": KEY, "GPT4ALL_J_API_KEY_FILE": str(keyfile), "GPT4ALL_J_CORS_ORIGINS": ORIGIN,
           "GPT4ALL_J_MAX_BODY_BYTES": "65536", "GPT4ALL_J_AUTH_DOCS": "false"}
    srv = start_server(_registry(model_files, d), d / "server.log", extra_env=env)
    yield srv
    stop_server(srv)


def raw(srv, request: bytes, timeout: float = 20) -> bytes:
    """Send raw bytes, return what comes back until the server answers (or closes)."""
    host, port = srv.base.removeprefix("http://").split(":")
    data = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        try:
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass  # no answer in time: the caller's assertion says what was expected
    return data


def test_ready_shows_only_states_without_a_key(keyed):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(keyed.base + "/ready", headers=headers)
        assert r.status_code == 200 and r.json() == PUBLIC, r.text
        for leak in ("root", "/", "pid", "magic"):
            assert leak not in r.text, leak


def test_ready_details_with_a_key(keyed):
    for key in (KEY, FILE_KEY):
        body = httpx.get(keyed.base + "/ready", headers={"Authorization": f"Bearer {key}"}).json()
        succ = body["models"]["succ"]
        assert succ["state"] == "ready" and succ["alive"] == 1 and len(succ["worker_pids"]) == 1
        assert {"busy", "queued", "restarts", "problem", "workers", "available"} <= set(succ)
        assert "bad magic b'root'" in body["skipped"]["shadow"] and body["missing"] == {}
        assert body["models"]["absent"]["problem"] == body["skipped"]["absent"]


def test_without_keys_details_only_for_this_machine(open_srv):
    local = httpx.get(open_srv.base + "/ready").json()
    assert local["models"]["succ"]["worker_pids"] and "shadow" in local["skipped"]
    # a client elsewhere, as a proxy on this machine reports it (uvicorn trusts X-Forwarded-For from
    # 127.0.0.1): states only
    remote = httpx.get(open_srv.base + "/ready", headers={"X-Forwarded-For": "203.0.113.7"})
    assert remote.status_code == 200 and remote.json() == PUBLIC


def test_head_on_health_and_ready(open_srv, keyed):
    for srv in (open_srv, keyed):
        for path in ("/health", "/ready"):
            r = httpx.head(srv.base + path)
            assert r.status_code == 200 and r.content == b"", (path, r.status_code)


def test_options_needs_a_key_and_never_waits_for_a_body(keyed):
    # declares a body within the cap and sends none of it: before, OPTIONS skipped the key check and
    # waited for the body (any client could make the server buffer up to --max-body-bytes)
    answer = raw(keyed, b"OPTIONS /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 60000\r\n\r\n", 15)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    r = httpx.options(keyed.url + "/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405  # with a key, the app answers: no OPTIONS route
    pre = httpx.options(keyed.url + "/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN


def test_refusals_carry_cors_headers_for_allowed_origins(keyed):
    r = httpx.get(keyed.url + "/models", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers.get("access-control-allow-origin") == ORIGIN
    assert "x-request-id" in r.headers.get("access-control-expose-headers", "").lower()
    r = httpx.post(keyed.url + "/completions", json={"model": "succ", "prompt": "x" * 70000},
                   headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.headers.get("access-control-allow-origin") == ORIGIN
    r = httpx.get(keyed.url + "/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 401 and "access-control-allow-origin" not in r.headers


LINKS = re.compile(r"""(?:src|href|spec-url)=["']([^"']+)["']|url: ?'([^']+)'""")


def test_docs_work_offline(open_srv):
    urls = set()
    for page in ("/docs", "/redoc"):
        r = httpx.get(open_srv.base + page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "http://" not in r.text and "https://" not in r.text
        urls |= {a or b for a, b in LINKS.findall(r.text)}
    assert {"/openapi.json", "/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css",
            "/docs-assets/redoc.standalone.js", "/docs-assets/favicon.png"} == urls
    kinds = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}
    for url in urls:
        r = httpx.get(open_srv.base + url)
        assert r.status_code == 200 and len(r.content) > 1000, url
        assert kinds[url[url.rindex("."):]] in r.headers["content-type"], (url, r.headers["content-type"])


def test_openapi_declares_the_bearer_key_and_says_how_to_use_it(open_srv):
    spec = httpx.get(open_srv.base + "/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["apiKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert spec["security"] == [{"apiKey": []}, {}]
    assert "Authorization: Bearer <key>" in spec["info"]["description"]
    assert "Authorize" in spec["info"]["description"]


def test_docs_open_without_a_key_only_when_configured(keyed):
    for path in ("/docs", "/redoc", "/openapi.json", "/docs-assets/swagger-ui-bundle.js"):
        assert httpx.get(keyed.base + path).status_code == 200, path
    assert httpx.get(keyed.url + "/models").status_code == 401
    # a path that starts like an open one but is not below it: never served without a key
    answer = raw(keyed, b"GET /docs-assets/../v1/models HTTP/1.1\r\nHost: t\r\n\r\n")
    assert answer.startswith((b"HTTP/1.1 404", b"HTTP/1.1 401", b"HTTP/1.1 400")), answer[:200]


def test_startup_log_says_auth_is_on(keyed, open_srv):
    assert ("API key authentication is on (2 keys); open without a key: /, /docs, /docs-assets/*, /health, "
            "/metrics, /openapi.json, /ready, /redoc, /ui/*") in keyed.logs()
    assert "API key authentication is off" in open_srv.logs()
