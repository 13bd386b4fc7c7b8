"""Browser fixtures: the real server in a subprocess (tests/e2e/conftest.py's helpers) and Debian's Chromium
driven by Playwright, with every request to a host other than this machine blocked and recorded."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.browser.chat_models import write_coder, write_long
from tests.e2e.conftest import serve_registry

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
API_KEY = "browser-test-key"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
LOCAL_SCHEMES = {"data", "blob", "about"}

REGISTRY = """
templates:
  chat: {{system: "{{content}}\\n", user: "User: {{content}}\\n", assistant: "Assistant: {{content}}\\n", generation: "Assistant:"}}
models:
  - id: coder
    path: {coder}
    prompt_template: chat
    workers: 1
  - id: long
    path: {long}
    prompt_template: chat
    workers: 1
  - id: busy  # the same talker through ctransformers: one generation at a time, no queue
    path: {long}
    prompt_template: chat
    engine: ctransformers
    workers: 1
    max_queue: 0
"""


@pytest.fixture(scope="session")
def chat_models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("chat-models")
    return {"coder": write_coder(d / "coder.bin"), "long": write_long(d / "long.bin")}


def _registry(models: dict[str, Path], only: tuple[str, ...] | None = None) -> str:
    text = REGISTRY.format(**{k: str(v) for k, v in models.items()})
    if only:
        blocks = text.split("\n  - id: ")
        text = "\n  - id: ".join([blocks[0]] + [b for b in blocks[1:] if b.split("\n")[0] in only])
    return text


@pytest.fixture(scope="session")
def chat_server(chat_models, tmp_path_factory):
    """The server without keys, chat page on (the default)."""
    yield from serve_registry(_registry(chat_models), tmp_path_factory.mktemp("chat-server"))


@pytest.fixture(scope="session")
def keyed_server(chat_models, tmp_path_factory):
    """A server that requires API_KEY."""
    yield from serve_registry(_registry(chat_models, ("coder",)), tmp_path_factory.mktemp("keyed-server"),
                              {"GPT4ALL_J_API_KEYS": API_KEY})


def is_local(url: str) -> bool:
    """Whether a URL stays on this machine (loopback hosts, data:, blob:, about:)."""
    parts = urlsplit(url)
    return parts.scheme in LOCAL_SCHEMES or (parts.hostname or "") in LOCAL_HOSTS or \
        f"[{parts.hostname}]" in LOCAL_HOSTS


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium (never a downloaded browser); missing, the tests fail and say so.

    Module-scoped: Playwright's sync API runs an event loop in this thread while it is open, so it is closed
    before tests elsewhere in the suite call asyncio.run()."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium "
                    "(apt-get install chromium; .ci/run installs it)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions"])
        yield b
        b.close()


class Tab:
    """A page in its own browser context, with what it tried to fetch outside and its console errors."""

    def __init__(self, context, page) -> None:
        self.context = context
        self.page = page
        self.external: list[str] = []
        self.errors: list[str] = []
        self.requests: list = []


@pytest.fixture()
def open_tab(browser):
    """Factory: open_tab(url, viewport=..., storage=...) → Tab; external requests are blocked and recorded."""
    tabs: list[Tab] = []

    def open_(url: str, viewport: dict | None = None, permissions: list[str] | None = None) -> Tab:
        context = browser.new_context(viewport=viewport or {"width": 1280, "height": 860},
                                      permissions=permissions or [])
        page = context.new_page()
        tab = Tab(context, page)

        def guard(route) -> None:
            tab.external.append(route.request.url)
            route.abort()

        context.route(lambda u: not is_local(u), guard)
        page.on("request", lambda r: tab.requests.append(r) if is_local(r.url) else tab.external.append(r.url))
        page.on("console", lambda m: tab.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: tab.errors.append(str(e)))
        tabs.append(tab)
        page.goto(url)
        return tab

    yield open_
    for tab in tabs:
        tab.context.close()
    assert not [u for tab in tabs for u in tab.external], "the page tried to reach the network"
