"""Interactive API docs that work offline: Swagger UI and ReDoc served from a local package, with an
HTTP bearer scheme in the OpenAPI description so Swagger UI's Authorize button takes an API key."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
# what --no-auth-docs opens when keys are set (an entry ending in "/" opens everything below it)
DOCS_PATHS = frozenset({"/docs", "/redoc", "/openapi.json", ASSETS_URL + "/"})
SCHEME = "apiKey"

AUTH_HELP = (
    "\n\n**Authorization.** When the server is started with API keys (`--api-keys` or `--api-key-file`), "
    "every request needs the header `Authorization: Bearer <key>`; without a valid key the answer is 401 "
    "`invalid_api_key`. `/health`, `/ready` and `/metrics` stay open unless `--auth-health` / "
    "`--auth-metrics` are set. On this page, press **Authorize** and paste the key alone (without "
    "`Bearer`): \"Try it out\" then sends it. A browser cannot send the header when it loads the page "
    "itself, so with keys set these docs open in a browser only when the server runs with `--no-auth-docs` "
    "(the docs show the API's shape, not its data); otherwise fetch `/openapi.json` with the header."
)


def assets_dir() -> str:
    """The folder of the bundled Swagger UI and ReDoc files (from the fastapi-offline package)."""
    return str(resources.files("fastapi_offline") / "static")


# ReDoc's bundle shows a logo from its vendor's CDN in the menu's footer; offline it points nowhere (the image
# fails to load and ReDoc hides it), so the docs never reach the network.
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
REDOC_JS = "redoc.standalone.js"  # the bundle's own name, answered by the route below before the mount


def redoc_script() -> bytes:
    """The bundled ReDoc script without its one remote URL that a browser would load (its footer logo)."""
    with open(f"{assets_dir()}/redoc.standalone.js", "rb") as f:
        return f.read().replace(REDOC_LOGO, b"data:,")


def install_docs(app: FastAPI) -> None:
    """Serve /docs (Swagger UI) and /redoc from local assets; build the app with docs_url=redoc_url=None."""
    app.description = (app.description or "") + AUTH_HELP
    redoc_js: list[bytes] = []

    @app.get(f"{ASSETS_URL}/{REDOC_JS}", include_in_schema=False)
    async def redoc_bundle() -> Response:  # before the mount below, which would answer this path otherwise
        if not redoc_js:
            redoc_js.append(redoc_script())
        return Response(redoc_js[0], media_type="text/javascript; charset=utf-8",
                        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})

    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")
    title = app.title

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=f"{title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            # no online validator badge (it would load an image from the internet)
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=root + app.openapi_url, title=f"{title} - ReDoc",
                              redoc_js_url=f"{root}{ASSETS_URL}/{REDOC_JS}",
                              redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png", with_google_fonts=False)

    _add_bearer_scheme(app)


def _add_bearer_scheme(app: FastAPI) -> None:
    """Declare the optional bearer key in the OpenAPI description (wraps the app's openapi builder)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes[SCHEME] = {"type": "http", "scheme": "bearer",
                               "description": "An API key from --api-keys or --api-key-file, sent as "
                                              "`Authorization: Bearer <key>` (needed only when keys are set)."}
            schema["security"] = [{SCHEME: []}, {}]  # {}: no key needed when the server has none
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
