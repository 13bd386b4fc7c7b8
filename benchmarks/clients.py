"""Concurrent streaming clients against the server under test (used by the pool sweep and the engines sweep)."""

from __future__ import annotations

import threading

from benchmarks import common as c


def client_level(port: int, model_id: str, clients: int, per_client: int, n: int, eos: int,
                 prompts: c.Prompts) -> dict:
    """`clients` streaming clients at once, each sending per_client requests back to back.

    ttft, latency and stream_tok_s are per request, in the same order; stream_tok_s is a request's
    decode rate after its first text, (completion tokens - 1) / (latency - ttft).
    """
    work = [prompts.many(per_client) for _ in range(clients)]
    results: list[dict] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients)
    lock = threading.Lock()

    def client(mine: list[str]) -> None:
        barrier.wait()
        for p in mine:
            try:
                r = c.post_stream(port, "/v1/completions", c.completion_body(model_id, p, n, eos))
            except Exception as exc:  # noqa: BLE001 - recorded, not fatal: a sweep should finish
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(w,)) for w in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not results:
        return {"clients": clients, "requests": 0, "errors": errors, "tokens": 0, "seconds": None,
                "tok_s": None, "ttft": [], "latency": [], "stream_tok_s": []}
    start = min(r["t0"] for r in results)
    end = max(r["t0"] + r["total"] for r in results)
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": errors, "tokens": tokens,
            "seconds": end - start, "tok_s": tokens / (end - start),
            "ttft": [r["ttft"] for r in results], "latency": [r["total"] for r in results],
            "stream_tok_s": [stream_rate(r) for r in results]}


def stream_rate(r: dict) -> float | None:
    """A request's decode rate after its first text (None when it had no text or a single token)."""
    tokens = r["usage"]["completion_tokens"]
    if r["ttft"] is None or tokens < 2 or r["total"] <= r["ttft"]:
        return None
    return (tokens - 1) / (r["total"] - r["ttft"])
