"""The request-context middleware's security edges: OPTIONS, bodies never read, key state, access log."""

import asyncio
import logging

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from server.middleware import RequestContext


async def echo(request):
    body = await request.body()
    key_ok = request.state.record.key_ok
    return PlainTextResponse(f"{request.method} {len(body)} {key_ok}")


def app(**kw):
    routes = [Route(p, echo, methods=["GET", "POST", "OPTIONS"]) for p in ("/health", "/v1/x", "/docs-assets/a")]
    options = {"keys": [], "open_paths": {"/health"}, "max_body": 100, "metrics": None, "log_requests": False,
               **kw}
    return RequestContext(Starlette(routes=routes), **options)


def call(asgi, method, path, messages=None, headers=()):
    """Run one request; `messages` are what receive() gives (recorded as they are taken)."""
    sent, taken = [], []
    queue = list(messages or [{"type": "http.request", "body": b"", "more_body": False}])

    async def receive():
        taken.append(queue[0] if queue else "waited")
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)  # a client that sends nothing more

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(k.encode(), v.encode()) for k, v in headers], "client": ("127.0.0.1", 1),
             "server": ("t", 80), "scheme": "http", "http_version": "1.1", "root_path": ""}
    asyncio.run(asyncio.wait_for(asgi(scope, receive, send), 10))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body.decode(), taken


BIG = [{"type": "http.request", "body": b"x" * 60, "more_body": True}]  # and then nothing: would wait


def test_options_without_a_key_is_401_and_reads_no_body():
    status, headers, body, taken = call(app(keys=["k"]), "OPTIONS", "/v1/x", BIG,
                                        headers=[("content-length", "90")])
    assert status == 401 and "invalid_api_key" in body and taken == []
    assert headers[b"www-authenticate"] == b"Bearer"


def test_options_get_and_head_never_read_the_body():
    for method in ("OPTIONS", "GET"):
        status, _, body, taken = call(app(), method, "/v1/x", BIG, headers=[("content-length", "90")])
        assert (status, body, taken) == (200, f"{method} 0 None", [])
    status, _, body, _ = call(app(), "POST", "/v1/x", [{"type": "http.request", "body": b"abc"}])
    assert body == "POST 3 None"  # a POST body is still read and passed on


def test_options_with_a_key_reaches_the_app():
    status, _, body, _ = call(app(keys=["k"]), "OPTIONS", "/v1/x", headers=[("authorization", "Bearer k")])
    assert (status, body) == (200, "OPTIONS 0 True")


def test_key_state_is_recorded_also_on_open_paths():
    asgi = app(keys=["k"])
    assert call(asgi, "GET", "/health")[2] == "GET 0 False"
    assert call(asgi, "GET", "/health", headers=[("authorization", "Bearer k")])[2] == "GET 0 True"
    assert call(asgi, "GET", "/health", headers=[("authorization", "Bearer \xe9")])[2] == "GET 0 False"


def test_open_path_prefixes():
    asgi = app(keys=["k"], open_paths={"/docs-assets/"})
    assert call(asgi, "GET", "/docs-assets/a")[0] == 200
    assert call(asgi, "GET", "/health")[0] == 401  # not listed
    assert call(asgi, "GET", "/docs-assets")[0] == 401  # the prefix itself without the slash is not open


def test_access_log_names_the_outcome(caplog):
    async def done(request):
        request.state.record.outcome = "cut:shutdown"
        return PlainTextResponse("x")

    asgi = RequestContext(Starlette(routes=[Route("/v1/x", done, methods=["POST"])]), keys=[],
                          open_paths=set(), max_body=100, metrics=None, log_requests=True)
    with caplog.at_level(logging.INFO, logger="gpt4all_j_server.access"):
        call(asgi, "POST", "/v1/x")
        call(app(log_requests=True), "GET", "/v1/x")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].endswith(" outcome=cut:shutdown") and lines[1].endswith(" outcome=-"), lines

