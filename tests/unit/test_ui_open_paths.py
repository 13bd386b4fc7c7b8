"""The chat page's open paths: "/" opens the root alone, "/ui/" everything below it; the page's metrics labels."""

import logging

from server.middleware import route_label
from server.security import open_paths, startup_notes
from server.settings import Settings
from tests.unit.test_security_middleware import app, call


def test_root_opens_only_itself():
    asgi = app(keys=["k"], open_paths={"/", "/ui/"})
    assert call(asgi, "GET", "/v1/x")[0] == 401  # "/" is not a prefix of every path
    assert call(asgi, "GET", "/health")[0] == 401
    assert call(asgi, "GET", "/v1/x", headers=[("authorization", "Bearer k")])[0] == 200


def test_page_paths_follow_the_ui_setting():
    assert {"/", "/ui/"} <= open_paths(Settings())
    assert not {"/", "/ui/"} & open_paths(Settings(ui=False))
    note = startup_notes(Settings(), ["k"])[0]
    assert note[0] == logging.INFO and "open without a key: /, /health, /metrics, /ready, /ui/*" in note[1]


def test_page_routes_have_their_own_metric_labels():
    assert route_label("/") == "/"
    assert route_label("/ui/app.js") == "/ui/{file}"
    assert route_label("/uix") == "other"
    # and the endpoints added with it (issue 12)
    assert route_label("/v1/embeddings") == "/v1/embeddings"
    assert route_label("/v1/responses") == "/v1/responses"
    assert route_label("/v1/responses/resp_1/input_items") == "/v1/responses/{response_id}"
