"""The chat page's error messages, from the API's error body, in the page's alert region."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.browser.conftest import API_KEY
from tests.browser.helpers import TIMEOUT_MS, ready, send, wait_idle, wait_reply_done


def alert_text(tab) -> str:
    alert = tab.page.get_by_role("alert")
    alert.wait_for(state="visible", timeout=TIMEOUT_MS)
    return alert.locator("p").inner_text()


def test_bad_key_is_explained_and_a_good_key_is_kept(keyed_server, open_tab):
    tab = open_tab(keyed_server.base + "/")  # the page itself is open without a key
    page = tab.page
    assert "Wrong or missing API key" in alert_text(tab)
    key = page.get_by_label("API key")
    assert key.is_visible()  # the settings opened at the key field
    key.fill("not-the-key")
    key.press("Tab")
    page.wait_for_function("() => document.getElementById('model-note').textContent === 'no model list'",
                           timeout=TIMEOUT_MS)
    assert "Incorrect API key provided" in alert_text(tab)
    key.fill(API_KEY)
    key.press("Tab")
    ready(tab, "coder")
    assert page.get_by_role("alert").is_hidden()
    send(tab, "hello")
    wait_reply_done(tab)
    assert tab.requests[-1].headers.get("authorization") == f"Bearer {API_KEY}"
    page.reload()
    ready(tab)  # the key was kept in the browser


def test_a_bad_key_on_send_shows_401(keyed_server, open_tab):
    tab = open_tab(keyed_server.base + "/")
    page = tab.page
    key = page.get_by_label("API key")
    key.fill(API_KEY)
    key.press("Tab")
    ready(tab, "coder")
    key.evaluate("el => { el.value = 'revoked'; }")  # the key changes without a new model list
    send(tab, "hello")
    text = alert_text(tab)
    assert "Wrong or missing API key" in text and "Incorrect API key provided" in text
    assert page.locator(".message.assistant").count() == 0  # no empty reply is left behind


def test_context_too_long_is_explained(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/")
    ready(tab, "coder")
    send(tab, "word " * 600)
    text = alert_text(tab)
    assert "too long for the model" in text and "context" in text, text
    assert tab.page.locator(".message.user").count() == 1


def test_queue_full_is_explained(chat_server, open_tab):
    """`busy` takes one generation and queues none: while another client's reply runs, the page's is a 503."""
    body = {"model": "busy", "messages": [{"role": "user", "content": "go"}], "max_tokens": 2000,
            "temperature": 0, "stream": True}
    tab = open_tab(chat_server.base + "/")
    ready(tab, "busy")
    with httpx.stream("POST", chat_server.url + "/chat/completions", json=body, timeout=60) as other:
        assert other.status_code == 200
        lines = other.iter_lines()  # kept: closing this iterator would close the stream
        for line in lines:
            if line.startswith("data: "):
                break
        send(tab, "hello")
        text = alert_text(tab)
    assert text.startswith("The model is busy:") and "Retry in" in text, text
    assert wait_idle(chat_server, "busy")


def test_network_error_is_explained(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/")
    ready(tab, "coder")
    tab.page.route("**/v1/chat/completions", lambda route: route.abort())
    send(tab, "hello")
    assert "Cannot reach the server" in alert_text(tab)
    tab.page.get_by_role("button", name="Dismiss the error").click()
    assert tab.page.get_by_role("alert").is_hidden()


def test_error_event_in_the_stream_is_explained(chat_server, open_tab):
    """An error after the reply began (the stream's `data: {"error": ...}` event): the text so far stays, the
    alert says why it ended. The stream is played by the browser's router: how the server ends a stream with an
    error event is tested in tests/e2e."""
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "coder",
             "choices": [{"index": 0, "delta": {"content": "Partial answer"}, "finish_reason": None}]}
    error = {"error": {"message": "The server is shutting down.", "type": "server_error", "param": None,
                       "code": "server_shutting_down"}}
    body = f"data: {json.dumps(chunk)}\r\n\r\n: ping\r\n\r\ndata: {json.dumps(error)}\r\n\r\ndata: [DONE]\r\n\r\n"
    tab = open_tab(chat_server.base + "/")
    ready(tab, "coder")
    tab.page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    send(tab, "hello")
    assert alert_text(tab) == "The server is shutting down: The server is shutting down."
    wait_reply_done(tab)
    assert tab.page.locator(".message.assistant .body").inner_text() == "Partial answer"
    assert "failed" in tab.page.locator(".message.assistant .stats").inner_text()


@pytest.mark.parametrize(("status", "code", "expected"), [
    (503, "queue_full", "The model is busy: Full. Retry in 3 s."),
    (503, "model_unavailable", "Model unavailable: Full. Retry in 3 s."),
    (400, "context_length_exceeded", "The conversation is too long for the model: Full."),
    (401, "invalid_api_key", "Wrong or missing API key"),
    (500, "internal_error", "Error 500 (internal_error): Full."),
    (0, "something_else", "Error (something_else): Full."),
])
def test_error_messages_name_the_problem(chat_server, open_tab, status, code, expected):
    tab = open_tab(chat_server.base + "/")
    text = tab.page.evaluate(
        "async ([s, c]) => (await import('./ui/api.js')).explain(s, {message: 'Full.', code: c}, '3')",
        [status, code])
    assert text.startswith(expected), text
