"""The README's screenshot of the chat page: a real conversation with the `coder` test model, desktop size.

Always run (the scene must render); the PNG is rewritten only with UPDATE_SCREENSHOT=1:
    UPDATE_SCREENSHOT=1 python -m pytest tests/browser/test_screenshot.py
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.browser.helpers import open_settings, ready, send, wait_reply_done

PNG = Path(__file__).with_name("chat-page.png")


def test_readme_screenshot(chat_server, open_tab):
    tab = open_tab(chat_server.base + "/", viewport={"width": 1280, "height": 800})
    page = tab.page
    page.emulate_media(color_scheme="light")
    ready(tab, "coder")
    open_settings(tab)
    page.get_by_label("System prompt").fill("You are a concise coding assistant.")
    page.get_by_role("button", name="Settings").click()  # close the panel again
    send(tab, "Write a Python function that returns the n-th Fibonacci number.")
    wait_reply_done(tab)
    page.get_by_label("Message", exact=True).fill("Can you make it recursive?")
    page.locator("#prompt").blur()
    assert page.locator(".message.assistant pre code").is_visible()
    assert tab.errors == []
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        page.screenshot(path=str(PNG))
        print(f"\nwrote {PNG}")
