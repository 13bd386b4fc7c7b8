"""Time to first token of a request that arrives while other streams are running (issue 10, section 3).

The sweep's 8-client level starts 8 requests at one barrier: every prompt is evaluated before most of them
see a token, so its TTFT measures the cost of 8 prompts arriving together. "New requests join the running
batch" is measured here instead: `background` long streams run, and `probes` requests, one after the other,
arrive among them; their TTFT is compared with the same probes sent to the idle server, alternating
(idle probe, joined probe, ...) so drift hits both.
"""

from __future__ import annotations

import json
import socket
import threading
import time

from benchmarks import common as c


class Background:
    """`count` streaming completions that run until stopped (their sockets closed: the server cancels them)."""

    def __init__(self, port: int, model_id: str, count: int, n: int, eos: int, prompts: c.Prompts) -> None:
        self.port, self.model_id, self.n, self.eos = port, model_id, n, eos
        self.stop = threading.Event()
        self.first = [threading.Event() for _ in range(count)]
        self.threads = [threading.Thread(target=self._run, args=(p, e), daemon=True)
                        for p, e in zip(prompts.many(count), self.first)]

    def __enter__(self) -> Background:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def wait_running(self, timeout: float = 300) -> bool:
        """True once every background stream has produced text."""
        end = time.monotonic() + timeout
        return all(e.wait(max(0.0, end - time.monotonic())) for e in self.first)

    def _run(self, prompt: str, first: threading.Event) -> None:
        body = json.dumps({**c.completion_body(self.model_id, prompt, self.n, self.eos), "stream": True}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
            sock.sendall(head + body)
            seen = b""
            while not self.stop.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                if not first.is_set():
                    *lines, seen = (seen + data).split(b"\n")
                    if any(x.startswith(b"data: {") and c.has_text(x[6:], chat=False) for x in lines):
                        first.set()


def join_level(port: int, model_id: str, background: int, probes: int, n_background: int, n_probe: int,
               eos: int, prompts: c.Prompts) -> dict:
    """Probe TTFTs alone and among `background` running streams, alternating; seconds, per probe."""
    alone: list[float] = []
    joined: list[float] = []
    others: list[float] = []
    for _ in range(probes):
        alone.append(_probe(port, model_id, n_probe, eos, prompts))
        with c.Contention() as busy, Background(port, model_id, background, n_background, eos, prompts) as bg:
            if not bg.wait_running():
                raise RuntimeError(f"{model_id}: the {background} background streams did not all start")
            joined.append(_probe(port, model_id, n_probe, eos, prompts))
        others.append(busy.result["foreign_share"])
    return {"background": background, "probes": probes, "alone_ttft": alone, "joined_ttft": joined,
            "alone_p50_ms": c.median(alone) * 1e3, "joined_p50_ms": c.median(joined) * 1e3,
            "ratio": c.median(joined) / c.median(alone), "others_share": max(others)}


def _probe(port: int, model_id: str, n: int, eos: int, prompts: c.Prompts) -> float:
    r = c.post_stream(port, "/v1/completions", c.completion_body(model_id, prompts.next(), n, eos))
    if r["ttft"] is None:
        raise RuntimeError(f"{model_id}: a probe produced no text")
    return r["ttft"]
