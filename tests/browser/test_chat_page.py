"""The chat page in a real browser (Debian's Chromium) against the real server: load, model list, streaming,
Stop (checked on the server), regenerate, edit-and-resend, conversations, keyboard, copy, phone size."""

from __future__ import annotations

import pytest

from tests.browser.chat_models import CODER_REPLY
from tests.browser.helpers import (
    TIMEOUT_MS,
    access_lines,
    chat_posts,
    metric,
    open_settings,
    ready,
    reply_texts,
    send,
    set_range,
    wait_idle,
    wait_reply_done,
)
from tests.e2e.conftest import wait_for

CODE = CODER_REPLY.split("```python\n")[1].split("```")[0].rstrip("\n")
LONG_MAX = 2000


def test_page_loads_offline_without_console_errors(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/")
    ready(tab)
    page = tab.page
    assert page.title() == "gpt4all-j-server chat"
    assert sorted(page.locator("#model option").all_inner_texts()) == ["busy", "coder", "long"]
    assert tab.errors == []
    assert tab.external == []
    # what the page fetched: its own files and the model list, all from the server
    paths = {r.url.removeprefix(chat_server.base) for r in tab.requests}
    assert {"/", "/ui/app.js", "/ui/style.css", "/v1/models"} <= paths


def test_controls_have_accessible_names(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/")
    page = tab.page
    open_settings(tab)
    for label in ("API key", "System prompt", "Temperature", "Top p", "Max tokens", "Model", "Message"):
        assert page.get_by_label(label).count() >= 1, label
    assert page.get_by_role("log").count() == 1  # the conversation: aria-live, read as it grows
    assert page.locator("[role=alert]").count() == 1
    assert page.get_by_role("button", name="Send", exact=True).is_visible()


def _start_long_reply(tab, model: str = "long") -> None:
    ready(tab, model)
    open_settings(tab)
    set_range(tab, "Temperature", 0)
    tab.page.get_by_label("Max tokens").fill(str(LONG_MAX))
    send(tab, "Tell me a long story.")


def _growing_lengths(tab, server, n: int = 4) -> list[int]:
    """Lengths of the live reply seen `n` times, each longer than the last, while the server generates."""
    lengths = [0]
    for _ in range(n):
        tab.page.wait_for_function(
            "n => (document.querySelector('.message.assistant:last-child .body')?.innerText.length || 0) > n",
            arg=lengths[-1], timeout=TIMEOUT_MS)
        lengths.append(len(tab.page.locator(".message.assistant").last.locator(".body").inner_text()))
    return lengths[1:]


@pytest.mark.parametrize("model", ["long", "busy"])  # the batched ggml engine, and ctransformers
def test_reply_streams_and_stop_ends_generation_on_the_server(chat_server, open_tab, model):
    tab = open_tab(chat_server.base + "/")
    before = len(access_lines(chat_server, model))
    _start_long_reply(tab, model)
    lengths = _growing_lengths(tab, chat_server)
    busy = metric(chat_server, "gpt4all_j_workers_busy", model)
    assert lengths == sorted(set(lengths)), lengths  # the reply grew in the page
    assert busy == 1, "the server should still be generating while the reply grows"
    tab.page.get_by_role("button", name="Stop", exact=True).click()
    assert wait_idle(chat_server, model), "the generation went on after Stop"
    assert wait_for(lambda: len(access_lines(chat_server, model)) > before, timeout=30)
    line = access_lines(chat_server, model)[-1]
    print(f"\nreply lengths seen while streaming: {lengths}; server: {line}")
    assert line["outcome"] == "client_gone"
    assert int(line["completion_tokens"]) < LONG_MAX
    wait_reply_done(tab)
    stats = tab.page.locator(".message.assistant .stats").inner_text()
    # no usage after Stop: the rate and count of the streamed pieces, marked as estimates
    assert "TTFT" in stats and "≈" in stats and "tokens/s" in stats and stats.endswith("stopped"), stats
    assert tab.page.get_by_role("button", name="Send", exact=True).is_visible()
    assert tab.errors == []


def test_escape_stops_the_reply(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/")
    before = len(access_lines(chat_server, "long"))
    _start_long_reply(tab)
    _growing_lengths(tab, chat_server, n=1)
    tab.page.keyboard.press("Escape")
    assert wait_idle(chat_server, "long"), "the generation went on after Escape"
    assert wait_for(lambda: len(access_lines(chat_server, "long")) > before, timeout=30)
    assert access_lines(chat_server, "long")[-1]["outcome"] == "client_gone"
    wait_reply_done(tab)


def test_reply_renders_code_and_stats(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/")
    ready(tab, "coder")
    send(tab, "Write a Fibonacci function in Python.")
    wait_reply_done(tab)
    page = tab.page
    assert page.locator(".message.assistant pre code").inner_text() == CODE
    assert page.locator(".message.assistant code.inline").all_inner_texts() == ["O(n)", "fibonacci(10)"]
    stats = page.locator(".message.assistant .stats").inner_text()
    assert "TTFT" in stats and "tokens/s" in stats and "41 tokens" in stats, stats
    # the model's text is shown as text, never parsed as HTML
    send(tab, "<img src=x onerror=alert(1)>")
    wait_reply_done(tab, 2)
    assert page.locator(".message.user .body").last.inner_text() == "<img src=x onerror=alert(1)>"
    assert page.locator(".messages img").count() == 0


def test_regenerate_and_edit_and_resend(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/")
    ready(tab, "coder")
    page = tab.page
    send(tab, "first question")
    wait_reply_done(tab)
    page.get_by_role("button", name="Regenerate this reply").click()
    wait_for(lambda: len(chat_posts(tab)) == 2, timeout=30)
    wait_reply_done(tab)
    assert page.locator(".message").count() == 2  # the reply was replaced, not added
    assert chat_posts(tab)[1]["messages"] == [{"role": "user", "content": "first question"}]
    assert reply_texts(tab)[0].startswith("Sure! Here is")

    send(tab, "second question")
    wait_reply_done(tab, 2)
    assert page.locator(".message").count() == 4
    page.get_by_role("button", name="Edit this message and send it again").first.click()
    editor = page.get_by_label("Edit the message")
    assert editor.input_value() == "first question"
    editor.fill("edited question")
    editor.press("Enter")
    wait_for(lambda: len(chat_posts(tab)) == 4, timeout=30)
    wait_reply_done(tab)
    # the edited message replaced the conversation after it
    assert chat_posts(tab)[3]["messages"] == [{"role": "user", "content": "edited question"}]
    assert page.locator(".message").count() == 2
    assert page.locator(".message.user .body").inner_text() == "edited question"


def test_conversations_persist_across_reload(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/")
    ready(tab, "coder")
    page = tab.page
    open_settings(tab)
    page.get_by_label("System prompt").fill("You are terse.")
    send(tab, "alpha chat")
    wait_reply_done(tab)
    page.get_by_role("button", name="+ New chat").click()
    send(tab, "beta chat")
    wait_reply_done(tab)
    assert chat_posts(tab)[0]["messages"][0] == {"role": "system", "content": "You are terse."}
    assert chat_posts(tab)[1]["messages"] == [{"role": "user", "content": "beta chat"}]

    page.reload()
    ready(tab)
    titles = page.locator(".chat-open").all_inner_texts()
    assert titles == ["beta chat", "alpha chat"]
    assert page.locator(".message.user .body").inner_text() == "beta chat"  # the open one stays open
    page.get_by_role("button", name="alpha chat", exact=True).click()
    assert page.locator(".message.user .body").inner_text() == "alpha chat"
    open_settings(tab)
    assert page.get_by_label("System prompt").input_value() == "You are terse."
    page.get_by_role("button", name="Delete conversation: beta chat").click()
    page.reload()
    ready(tab)
    assert page.locator(".chat-open").all_inner_texts() == ["alpha chat"]
    assert page.locator(".message").count() == 2


def test_enter_sends_and_shift_enter_adds_a_line(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/")
    ready(tab, "coder")
    box = tab.page.get_by_label("Message", exact=True)
    box.click()
    box.type("line one")
    box.press("Shift+Enter")
    box.type("line two")
    assert box.input_value() == "line one\nline two"
    assert chat_posts(tab) == []
    box.press("Enter")
    wait_reply_done(tab)
    assert chat_posts(tab)[0]["messages"] == [{"role": "user", "content": "line one\nline two"}]
    assert box.input_value() == ""


def test_copy_buttons(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/", permissions=["clipboard-read", "clipboard-write"])
    ready(tab, "coder")
    send(tab, "code please")
    wait_reply_done(tab)
    page = tab.page
    page.get_by_role("button", name="Copy code").click()
    assert page.evaluate("navigator.clipboard.readText()") == CODE
    page.get_by_role("button", name="Copy reply").click()
    assert page.evaluate("navigator.clipboard.readText()") == CODER_REPLY


def test_phone_layout_has_no_horizontal_scroll(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/", viewport={"width": 390, "height": 844})
    ready(tab, "coder")
    page = tab.page
    send(tab, "a phone-sized question " * 6)
    wait_reply_done(tab)
    open_settings(tab)
    widths = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth, innerWidth]")
    assert max(widths[:2]) <= widths[2] == 390, widths
    sidebar = page.get_by_role("navigation", name="Conversations")
    assert not sidebar.is_visible()  # collapsed behind the ☰ button
    page.get_by_role("button", name="Show conversations").click()
    assert sidebar.is_visible()
    page.get_by_role("button", name="+ New chat").click()
    assert not sidebar.is_visible()
    assert page.locator(".chat-open").count() == 2
    page.get_by_role("button", name="Show conversations").click()
    page.get_by_role("button", name="Hide conversations").click()
    assert not sidebar.is_visible()
    page.get_by_role("button", name="Show conversations").click()
    page.keyboard.press("Escape")
    assert not sidebar.is_visible()


def test_follows_the_dark_scheme_of_the_system(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/")
    page = tab.page
    background = "() => getComputedStyle(document.body).backgroundColor"
    page.emulate_media(color_scheme="light")
    light = page.evaluate(background)
    page.emulate_media(color_scheme="dark")
    dark = page.evaluate(background)
    assert light == "rgb(255, 255, 255)" and dark != light
    assert sum(int(c) for c in dark[4:-1].split(",")) < 150  # a dark background
