"""The chat page under attack and misuse: corrupt storage, storage full, a stream cut off, hostile text in every
place the page shows text, empty or broken model lists, focus for keyboard users, and what a screen reader's
live region is given when a reply ends."""

from __future__ import annotations

import json

from tests.browser.helpers import (
    TIMEOUT_MS,
    chat_posts,
    open_settings,
    ready,
    reply_texts,
    send,
    set_range,
    wait_idle,
    wait_reply_done,
)

HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


def _alert(tab) -> str:
    alert = tab.page.get_by_role("alert")
    alert.wait_for(state="visible", timeout=TIMEOUT_MS)
    return alert.locator("p").inner_text()


def _chunk(text: str) -> str:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "coder",
             "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return f"data: {json.dumps(chunk)}\r\n\r\n"


def test_corrupt_stored_conversations_do_not_brick_the_page(chat_server, open_tab):
    """What another version of the page, an extension or a hand edit left in storage is mended or dropped."""
    chats = [None, "junk", {"id": "b"}, {"id": 7, "messages": []},
             {"id": "a", "updated": "yesterday", "messages": [
                 None, {"role": "user", "content": 5}, {"role": "tool", "content": "x"},
                 {"role": "user", "content": "kept question"},
                 {"role": "assistant", "content": "kept answer", "stats": {"tokensPerSecond": "fast", "ttft": "x"}},
             ]}, {"id": "a", "messages": [{"role": "user", "content": "a duplicate id"}]}]
    tab = open_tab(chat_server.base + "/")
    page = tab.page
    page.evaluate("""c => { localStorage.setItem('g4j.chats', JSON.stringify(c));
        localStorage.setItem('g4j.current', '"a"');
        localStorage.setItem('g4j.settings', JSON.stringify({temperature: 'hot', top_p: 9, max_tokens: -3})); }""",
                  chats)
    page.reload()
    ready(tab, "coder")
    assert page.locator(".chat-open").all_inner_texts() == ["New chat"]  # the one usable conversation
    assert page.locator(".message .body").all_inner_texts() == ["kept question", "kept answer"]
    send(tab, "and now?")
    wait_reply_done(tab)  # the kept answer's broken statistics are not shown
    body = chat_posts(tab)[0]
    assert body["messages"] == [{"role": "user", "content": "kept question"},
                                {"role": "assistant", "content": "kept answer"},
                                {"role": "user", "content": "and now?"}]  # no "system": it was missing
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.7, 0.95, 512)
    assert tab.errors == []


def test_full_storage_is_said_once(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/")
    ready(tab, "coder")
    tab.page.evaluate("""() => { for (const size of [1 << 20, 1 << 14, 1 << 8, 1]) {
        try { for (let i = 0; ; i++) localStorage.setItem(`fill-${size}-${i}`, 'x'.repeat(size)); } catch {} } }""")
    send(tab, "will this be kept?")
    assert "storage is full" in _alert(tab)
    wait_reply_done(tab)
    assert reply_texts(tab)[0].startswith("Sure! Here is")  # the page still works for this visit


def test_a_stream_that_ends_without_done_is_a_cut_off_reply(chat_server, open_tab):
    """A connection closed early (a proxy's timeout, a crash) must not pass for a complete reply."""
    tab = open_tab(chat_server.base + "/")
    ready(tab, "coder")
    tab.page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=_chunk("Half a rep")))
    send(tab, "hello")
    assert "cut off" in _alert(tab)
    wait_reply_done(tab)
    assert reply_texts(tab) == ["Half a rep"]
    assert "failed" in tab.page.locator(".message.assistant .stats").inner_text()


def test_hostile_text_is_shown_as_text_everywhere(chat_server, open_tab):
    """Model ids, model output (also inside code fences), error messages and titles never become markup."""
    tab = open_tab(chat_server.base + "/")
    page = tab.page
    models = {"object": "list", "data": [{"id": HOSTILE, "object": "model", "created": 1, "owned_by": "x"}]}
    page.route("**/v1/models", lambda route: route.fulfill(json=models))
    page.reload()
    ready(tab)
    assert page.locator("#model option").all_inner_texts() == [HOSTILE]
    stream = _chunk(f"{HOSTILE}\n```html\n{HOSTILE}\n```\n`{HOSTILE}`") + "data: [DONE]\r\n\r\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=stream))
    send(tab, HOSTILE)
    wait_reply_done(tab)
    error = {"error": {"message": HOSTILE, "type": "x", "param": None, "code": HOSTILE}}
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=500, json=error))
    send(tab, "again")
    assert HOSTILE in _alert(tab)
    assert page.locator(".chat-open").first.inner_text() == HOSTILE[:48]
    assert page.locator(".message.assistant pre code").inner_text() == HOSTILE
    assert page.locator("img, .messages script, .chat-list script").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert [e for e in tab.errors if "status of 500" not in e] == []  # the 500 itself is logged by Chromium


def test_an_empty_model_list_is_explained(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/")
    page = tab.page
    page.route("**/v1/models", lambda route: route.fulfill(json={"object": "list", "data": []}))
    page.reload()
    page.wait_for_function("() => document.getElementById('model-note').textContent === 'no model is served'",
                           timeout=TIMEOUT_MS)
    send(tab, "hello")
    assert "the server lists none" in _alert(tab)
    assert chat_posts(tab) == []


def test_a_model_list_that_is_not_json_is_explained(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/")
    page = tab.page
    page.route("**/v1/models", lambda route: route.fulfill(body="<html>a login page</html>",
                                                           headers={"Content-Type": "text/html"}))
    page.reload()
    assert "is not JSON" in _alert(tab)


def _focused(tab) -> str:
    return tab.page.evaluate("() => { const a = document.activeElement; "
                             "return a === document.body ? 'body' : (a.id || a.className) + ':' + a.textContent; }")


def test_focus_follows_keyboard_actions(chat_server, open_tab):
    """Keyboard only: focus never falls back to the page's top when the focused control goes away."""
    tab = open_tab(chat_server.base + "/")
    page = tab.page
    ready(tab, "long")
    open_settings(tab)
    set_range(tab, "Temperature", 0)
    page.get_by_label("Max tokens").fill("2000")
    page.get_by_label("Message", exact=True).fill("Tell me a long story.")
    page.keyboard.press("Tab")
    assert _focused(tab) == "send:Send"
    page.keyboard.press("Enter")
    page.locator(".message.assistant .body p").first.wait_for(timeout=TIMEOUT_MS)  # streaming
    assert _focused(tab) == "stop:Stop"  # Send went away: focus moved to Stop
    page.keyboard.press("Enter")
    wait_reply_done(tab)
    assert _focused(tab) == "prompt:"  # Stop went away: back to the message box
    page.get_by_role("button", name="Regenerate this reply").focus()
    page.keyboard.press("Enter")
    page.locator(".message.assistant .body p").first.wait_for(timeout=TIMEOUT_MS)
    assert _focused(tab) == "stop:Stop"
    page.keyboard.press("Escape")
    wait_reply_done(tab)
    assert _focused(tab) == "prompt:"
    assert wait_idle(chat_server, "long")

    page.get_by_role("button", name="+ New chat").focus()
    page.keyboard.press("Enter")
    assert _focused(tab) == "prompt:"
    page.get_by_role("button", name="Tell me a long story.", exact=True).focus()
    page.keyboard.press("Enter")  # switch back: the list is rebuilt, the keyboard keeps its place
    assert _focused(tab) == "chat-open:Tell me a long story."
    page.keyboard.press("Tab")
    assert _focused(tab) == "chat-delete:✕"
    page.keyboard.press("Enter")
    assert _focused(tab) == "chat-open:New chat"


def test_finished_reply_leaves_earlier_messages_alone(chat_server, open_tab):
    """The conversation is a live region (role=log): a reply must add its own nodes only, not rebuild every
    message (a screen reader would read the whole conversation again after each reply)."""
    tab = open_tab(chat_server.base + "/")
    ready(tab, "coder")
    page = tab.page
    send(tab, "one")
    wait_reply_done(tab)
    page.evaluate("""() => {
        document.querySelector('.message.user').dataset.mark = 'first';
        window.__added = [];
        new MutationObserver(records => { for (const r of records) for (const n of r.addedNodes)
            if (n.nodeType === 1 && n.matches('article')) window.__added.push(n.className); })
          .observe(document.getElementById('messages'), {childList: true}); }""")
    send(tab, "two")
    wait_reply_done(tab, 2)
    assert page.locator(".message.user").first.get_attribute("data-mark") == "first"
    assert page.evaluate("window.__added") == ["message user", "message assistant"]
    assert page.get_by_role("button", name="Regenerate this reply").count() == 1
    assert page.get_by_role("button", name="Edit this message and send it again").count() == 2


def test_phone_drawer_takes_and_gives_back_focus(chat_server, open_tab):
    """On a phone-sized screen the conversations are a drawer: opened from the keyboard, focus goes into it;
    Escape gives it back to the ☰ button; choosing a conversation puts it in the message box."""
    tab = open_tab(chat_server.base + "/", viewport={"width": 390, "height": 844})
    page = tab.page
    ready(tab, "coder")
    page.get_by_role("button", name="Show conversations").focus()
    page.keyboard.press("Enter")
    assert _focused(tab) == "chat-open:New chat"
    page.keyboard.press("Escape")
    assert _focused(tab) == "toggle-sidebar:☰"
    assert not page.get_by_role("navigation", name="Conversations").is_visible()
    page.keyboard.press("Enter")
    page.keyboard.press("Enter")  # the focused conversation: the drawer closes over it
    assert not page.get_by_role("navigation", name="Conversations").is_visible()
    assert _focused(tab) == "prompt:"


def test_a_failed_message_can_be_sent_again(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/")
    ready(tab, "coder")
    page = tab.page
    page.route("**/v1/chat/completions", lambda route: route.abort())
    send(tab, "are you there?")
    assert "Cannot reach the server" in _alert(tab)
    page.unroute("**/v1/chat/completions")
    page.get_by_role("button", name="Send this message again").click()
    wait_reply_done(tab)
    assert page.get_by_role("alert").is_hidden()
    assert [p["messages"] for p in chat_posts(tab)] == [[{"role": "user", "content": "are you there?"}]] * 2
    assert page.locator(".message").count() == 2


def _scroll(tab) -> dict:
    return tab.page.evaluate("() => { const m = document.getElementById('messages'); "
                             "return {top: m.scrollTop, gap: m.scrollHeight - m.scrollTop - m.clientHeight}; }")


def test_scroll_follows_the_reply_unless_the_reader_scrolled_up(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/", viewport={"width": 390, "height": 600})
    page = tab.page
    ready(tab, "long")
    open_settings(tab)
    set_range(tab, "Temperature", 0)
    page.get_by_label("Max tokens").fill("1500")  # with the byte-level prompt, within the 2,048 context
    page.get_by_role("button", name="Settings").click()
    send(tab, "\n".join(f"line {i}" for i in range(40)))  # taller than the conversation's box
    live = ".message.assistant:last-child .body"
    page.wait_for_function(f"() => document.querySelector('{live}')?.innerText.length > 0", timeout=TIMEOUT_MS)
    assert _scroll(tab)["gap"] < 80  # at the end, following the reply
    page.evaluate("() => { document.getElementById('messages').scrollTop = 0; }")  # the reader scrolls up
    seen = len(page.locator(live).inner_text())
    page.wait_for_function(f"n => document.querySelector('{live}').innerText.length > n", arg=seen,
                           timeout=TIMEOUT_MS)
    assert _scroll(tab)["top"] == 0  # the growing reply did not pull the reader down
    page.keyboard.press("Escape")
    wait_reply_done(tab)
    assert _scroll(tab)["top"] == 0  # nor did its end
    assert wait_idle(chat_server, "long")


def test_a_growing_reply_re_renders_only_its_end(chat_server, open_tab):
    """Each frame of a streaming reply renders the text so far: blocks that did not change keep their nodes
    (the cost is that of the growing end, not of the whole reply), and a changed block is replaced."""
    tab = open_tab(chat_server.base + "/")
    kept = tab.page.evaluate("""async () => {
        const r = await import('./ui/render.js');
        const d = document.createElement('div');
        r.renderContent(d, 'First paragraph.\\n\\n```js\\nlet a = 1;\\n```\\n\\nThe end is gro');
        const [p, code, last] = d.children;
        r.renderContent(d, 'First paragraph.\\n\\n```js\\nlet a = 1;\\n```\\n\\nThe end is growing.\\n\\nNew');
        const same = [d.children[0] === p, d.children[1] === code, d.children[2] === last];
        r.renderContent(d, 'Changed paragraph.');
        return [same, d.children.length, d.textContent]; }""")
    assert kept == [[True, True, False], 1, "Changed paragraph."]


def test_a_reply_that_arrives_in_one_burst_shows_a_lower_bound_of_its_rate(chat_server, open_tab):
    """Pieces that reach the page together (a fast model, or the network joining them) carry no timing: the
    rate is then the whole request's, marked "≥", never thousands of tokens/s from a few milliseconds."""
    usage = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "coder", "choices": [],
             "usage": {"prompt_tokens": 3, "completion_tokens": 40, "total_tokens": 43}}
    body = "".join(_chunk(f" w{i}") for i in range(40)) + f"data: {json.dumps(usage)}\r\n\r\ndata: [DONE]\r\n\r\n"
    tab = open_tab(chat_server.base + "/")
    ready(tab, "coder")
    tab.page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    send(tab, "hello")
    wait_reply_done(tab)
    stats = tab.page.locator(".message.assistant .stats").inner_text()
    assert "· ≥ " in stats and " tokens/s · 40 tokens" in stats, stats
