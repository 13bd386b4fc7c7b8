"""Small helpers of the browser tests: the page's controls, the server's own view of a generation."""

from __future__ import annotations

import json
import re

import httpx

from tests.e2e.conftest import Server, wait_for

TIMEOUT_MS = 30_000  # "did not hang" bound for anything the page waits for


def ready(tab, model: str | None = None) -> None:
    """Wait until the model list has filled (and pick `model`)."""
    tab.page.wait_for_function("() => document.querySelectorAll('#model option').length > 0", timeout=TIMEOUT_MS)
    if model:
        tab.page.get_by_label("Model", exact=True).select_option(model)


def set_range(tab, label: str, value: float) -> None:
    """Set a slider by its label, as a user dragging it would (an input event)."""
    tab.page.get_by_label(label).evaluate(
        "(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input', {bubbles: true})); }", value)


def open_settings(tab) -> None:
    """Show the settings panel if it is closed."""
    toggle = tab.page.get_by_role("button", name="Settings")
    if toggle.get_attribute("aria-expanded") != "true":
        toggle.click()


def send(tab, text: str) -> None:
    """Type a message and press Enter."""
    box = tab.page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def wait_reply_done(tab, count: int = 1) -> None:
    """Wait until `count` replies show their statistics line (the reply has ended)."""
    tab.page.wait_for_function(
        "n => document.querySelectorAll('.message.assistant .stats:not(:empty)').length >= n", arg=count,
        timeout=TIMEOUT_MS)


def reply_texts(tab) -> list[str]:
    """The text of every assistant message body."""
    return tab.page.locator(".message.assistant .body").all_inner_texts()


def chat_posts(tab) -> list[dict]:
    """The bodies of the chat completion requests the page sent, in order."""
    return [json.loads(r.post_data) for r in tab.requests
            if r.method == "POST" and r.url.endswith("/v1/chat/completions")]


def metric(server: Server, name: str, model: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    text = httpx.get(server.base + "/metrics", timeout=10).text
    match = re.search(rf'^{name}\{{model="{re.escape(model)}"\}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def access_lines(server: Server, model: str) -> list[dict[str, str]]:
    """The server's access log lines of chat completions for `model`, as key=value fields."""
    out = []
    for line in server.logs().splitlines():
        if '"POST /v1/chat/completions"' in line and f"model={model} " in line:
            out.append(dict(re.findall(r"(\w+)=(\S+)", line)))
    return out


def wait_idle(server: Server, model: str) -> bool:
    """Whether the model's running generations gauge returns to 0 within 30 s."""
    return wait_for(lambda: metric(server, "gpt4all_j_workers_busy", model) == 0, timeout=30)
