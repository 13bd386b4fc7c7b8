"""Raw SSE reading helpers for httpx."""

from __future__ import annotations

import json

import httpx


def read_events(response: httpx.Response) -> list[str]:
    """Every `data:` payload of an SSE response, checking the framing on the way."""
    payloads = []
    for line in response.iter_lines():
        if not line or line.startswith(":"):
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        payloads.append(line[len("data: "):])
    return payloads


def stream(client: httpx.Client, path: str, body: dict) -> tuple[list[dict], list[str]]:
    """POST a streaming request; returns the JSON chunks and the raw payloads (ending with [DONE])."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = read_events(r)
    assert raw[-1] == "[DONE]", raw[-3:]
    return [json.loads(p) for p in raw[:-1]], raw
