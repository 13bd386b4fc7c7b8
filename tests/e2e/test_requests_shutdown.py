"""SIGTERM during streams: a stream that finishes within the grace completes normally; one still running
when the grace is over ends with an error event (server_shutting_down) and `data: [DONE]`, never mid-way;
the server exits 0 and the log shows the drain and how each request ended."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import start_server
from tests.models import NO_EOS, write_random

GRACE = 2  # seconds: the short stream needs about 0.3 s of it, the long one about 20 s (at ~100 tokens/s)
SHORT_TOKENS, LONG_TOKENS = 30, 2000
REGISTRY = """
models:
  - id: long
    path: {path}
    prompt_template: plain
    workers: 2
"""


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A model slow enough that 2,000 tokens outlast the grace (2 workers: both streams run at once)."""
    d = tmp_path_factory.mktemp("shutdown")
    model = write_random(d / "long.bin", n_ctx=2048, n_embd=768, n_layer=12, seed=5)
    path = d / "registry.yaml"
    path.write_text(REGISTRY.format(path=model))
    return path


class StreamReader(threading.Thread):
    """Reads one SSE stream to its end in a thread; `started` is set at its first data event."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.started = threading.Event()
        self.payloads: list[str] = []
        self.status: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json={**self.body, "stream": True}, timeout=120) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.payloads.append(line[6:])
                        self.started.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.started.set()


def test_sigterm_finishes_short_streams_and_ends_long_ones_with_an_error_event(registry, tmp_path):
    srv = start_server(registry, tmp_path / "server.log", extra_env={"GPT4ALL_J_SHUTDOWN_GRACE": str(GRACE)})
    try:
        long = StreamReader(srv.url + "/completions",
                            {"model": "long", "prompt": "Once", "max_tokens": LONG_TOKENS, **NO_EOS})
        short = StreamReader(srv.url + "/chat/completions",
                             {"model": "long", "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": SHORT_TOKENS, **NO_EOS})
        long.start()
        assert long.started.wait(60)
        short.start()
        assert short.started.wait(60)
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        short.join(60)
        long.join(60)
        ended = time.monotonic() - signalled
        assert not short.is_alive() and not long.is_alive()
        assert srv.proc.wait(30) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    log = srv.logs()
    assert short.error is None and long.error is None, (short.error, long.error, log[-3000:])

    # the short stream finished normally within the grace
    assert short.payloads[-1] == "[DONE]", short.payloads[-3:]
    chunks = [json.loads(p) for p in short.payloads[:-1]]
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    # the long one was still running at the end of the grace: an error event, then [DONE]
    assert long.payloads[-1] == "[DONE]", long.payloads[-3:]
    last = json.loads(long.payloads[-2])
    assert last["error"]["code"] == "server_shutting_down", last
    assert all(json.loads(p).get("choices", [{}])[0].get("finish_reason") is None for p in long.payloads[:-2])
    assert ended < GRACE + 20, f"the streams ended {ended:.1f}s after SIGTERM"

    assert re.search(r"shutting down: \d+ request\(s\) running, waiting up to 2s", log), log[-3000:]
    assert "outcome=done" in log and "outcome=cut:shutdown" in log, log[-3000:]
    assert "Traceback" not in log and "ASGI callable returned without completing" not in log, log[-3000:]


def test_new_generations_are_refused_while_draining(registry, tmp_path):
    """A request that arrives while the server drains (its body completes after SIGTERM) gets 503
    server_shutting_down; when the grace is over a running non-streamed request gets a 503 too."""
    srv = start_server(registry, tmp_path / "server.log", extra_env={"GPT4ALL_J_SHUTDOWN_GRACE": "4"})
    outcome: dict[str, object] = {}

    def plain() -> None:
        try:
            outcome["response"] = httpx.post(srv.url + "/completions", timeout=120, json={
                "model": "long", "prompt": "Once", "max_tokens": LONG_TOKENS, **NO_EOS})
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    try:
        runner = threading.Thread(target=plain, daemon=True)
        runner.start()
        assert wait_busy(srv, 1), "the long request should be generating before the signal"
        body = json.dumps({"model": "long", "prompt": "x", "max_tokens": 2}).encode()
        port = int(srv.base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
            srv.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while "shutting down" not in srv.logs() and time.monotonic() < deadline:
                time.sleep(0.05)
            sock.sendall(body[5:])
            answer = read_response(sock)
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer[:500]
        assert b"retry-after" in head.lower()
        assert json.loads(payload)["error"]["code"] == "server_shutting_down"
        runner.join(60)
        assert srv.proc.wait(30) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    log = srv.logs()
    assert "error" not in outcome, (outcome, log[-3000:])
    response = outcome["response"]
    assert response.status_code == 503 and response.json()["error"]["code"] == "server_shutting_down", response.text
    assert "outcome=error:server_shutting_down" in log and "outcome=cut:shutdown" in log, log[-3000:]


def wait_busy(srv, workers: int) -> bool:
    """Wait until `workers` workers of the model are generating (per /ready's details for local callers)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if httpx.get(srv.base + "/ready", timeout=10).json()["models"]["long"].get("busy") == workers:
            return True
        time.sleep(0.05)
    return False


def read_response(sock: socket.socket) -> bytes:
    """One HTTP response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    while len(data.split(b"\r\n\r\n", 1)[1]) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
