"""The request-context middleware on a minimal app: keys, open paths, body cap, request ids."""

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from server.metrics import Metrics
from server.middleware import RequestContext, route_label


async def echo(request):
    body = await request.body()
    return PlainTextResponse(f"{len(body)} {request.state.record.request_id}")


def app(**kw):
    inner = Starlette(routes=[Route(p, echo, methods=["GET", "POST"]) for p in ("/health", "/metrics", "/v1/x")])
    options = {"keys": [], "open_paths": {"/health"}, "max_body": 100, "metrics": Metrics(),
               "log_requests": False, **kw}
    return RequestContext(inner, **options)


def call(asgi, method, path, **kw):
    async def go():
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


def test_keys_guard_everything_but_open_paths():
    asgi = app(keys=["k1", "k2"])
    assert call(asgi, "GET", "/v1/x").status_code == 401
    assert call(asgi, "GET", "/v1/x", headers={"Authorization": "Bearer k2"}).status_code == 200
    assert call(asgi, "GET", "/v1/x", headers={"Authorization": "bearer k1"}).status_code == 200
    assert call(asgi, "GET", "/v1/x", headers={"Authorization": "Bearer k"}).status_code == 401
    assert call(asgi, "GET", "/health").status_code == 200
    assert call(asgi, "GET", "/metrics").status_code == 401  # keyed unless listed as open
    body = call(asgi, "GET", "/v1/x").json()
    assert body["error"]["code"] == "invalid_api_key" and body["error"]["param"] is None


def test_no_keys_means_open():
    assert call(app(), "GET", "/v1/x").status_code == 200


def test_body_cap_declared_and_streamed():
    asgi = app()
    assert call(asgi, "POST", "/v1/x", content=b"x" * 100).text.startswith("100 ")
    assert call(asgi, "POST", "/v1/x", content=b"x" * 101).status_code == 413

    async def gen():
        for _ in range(5):
            yield b"x" * 30

    assert call(asgi, "POST", "/v1/x", content=gen()).status_code == 413


def test_request_id_honoured_only_when_sane():
    asgi = app()
    r = call(asgi, "GET", "/v1/x", headers={"X-Request-ID": "abc-1"})
    assert r.headers["x-request-id"] == "abc-1" and r.text.endswith("abc-1")
    r = call(asgi, "GET", "/v1/x", headers={"X-Request-ID": "bad id\nwith newline"})
    assert r.headers["x-request-id"] != "bad id\nwith newline" and len(r.headers["x-request-id"]) == 32


def test_route_labels_have_low_cardinality():
    assert route_label("/v1/models/anything/at/all") == "/v1/models/{model_id}"
    assert route_label("/random/probe") == "other"
