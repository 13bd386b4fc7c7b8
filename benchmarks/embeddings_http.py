"""HTTP pieces of the embeddings benchmark: streams whose events are timed as they arrive."""

from __future__ import annotations

import json
import socket
import threading
import time

from benchmarks import common as c


def stream(port: int, path: str, body: dict, first: threading.Event | None = None,
           timeout: float = 600) -> dict:
    """POST a streamed request over a raw socket; each SSE data payload with its arrival time (monotonic).

    The client only splits lines while receiving (its CPU competes with the engine on 2 cores); payloads are
    parsed at the end. `first` is set when the first payload that carries text arrives.
    """
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    t0 = time.monotonic()
    sock.sendall(head + payload)
    raw: list[bytes] = []
    times: list[float] = []  # arrival time of each data line, in order
    pending = b""
    while True:
        data = sock.recv(65536)
        if not data:
            break
        now = time.monotonic()
        raw.append(data)
        lines = (pending + data).split(b"\n")
        pending = lines.pop()
        for line in lines:
            if line.startswith(b"data: "):
                times.append(now)
                if first is not None and not first.is_set() and carries_text(line[6:]):
                    first.set()
    total = time.monotonic() - t0
    sock.close()
    status, events = c._sse_events(b"".join(raw))
    if status != 200:
        raise RuntimeError(f"HTTP {status} from {path}: {events[:1]!r}")
    if not events or events[-1] != b"[DONE]":
        raise RuntimeError(f"stream did not end with [DONE]: {events[-2:]!r}")
    if len(times) != len(events):
        raise RuntimeError(f"{len(times)} data lines timed, {len(events)} payloads parsed")
    return {"t0": t0, "total": total, "events": events, "times": times}


def carries_text(data: bytes) -> bool:
    """Whether one SSE payload carries generated text (a completion or chat chunk, or a Responses text delta)."""
    if data == b"[DONE]":
        return False
    obj = json.loads(data)
    if "type" in obj:
        return obj["type"] == "response.output_text.delta" and bool(obj.get("delta"))
    choices = obj.get("choices") or []
    if not choices:
        return False
    ch = choices[0]
    return bool(ch.get("text") or (ch.get("delta") or {}).get("content"))


def text_times(run: dict) -> list[float]:
    """Arrival times of a stream's payloads that carry text."""
    return [t for e, t in zip(run["events"], run["times"]) if carries_text(e)]


def final_usage(run: dict) -> dict | None:
    """A stream's usage: the chat/completion chunk's usage, or the final Responses event's response.usage."""
    for e in reversed(run["events"][:-1]):
        obj = json.loads(e)
        if "error" in obj:
            raise RuntimeError(f"stream error: {obj['error']}")
        if obj.get("usage"):
            return obj["usage"]
        if obj.get("type", "").startswith("response.") and (obj.get("response") or {}).get("usage"):
            return obj["response"]["usage"]
    return None
