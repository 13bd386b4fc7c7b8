"""The worker pool under the real server: queue limits, cancellation on disconnect, isolation."""

import threading
import time

import httpx

from tests.schemas import validate
from tests.models import NO_EOS

LONG = {"model": "slow", "prompt": "Once upon a time", "max_tokens": 1800, "temperature": 1.0, **NO_EOS,
        "seed": 1}


def _post_in_thread(url: str, body: dict, results: list) -> threading.Thread:
    def run():
        try:
            results.append(httpx.post(url + "/completions", json=body, timeout=120))
        except httpx.HTTPError as exc:  # pragma: no cover - reported by the assertion below
            results.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_full_queue_is_503_with_retry_after(server, client):
    """slow has 1 worker and max_queue 1: the third concurrent request is turned away."""
    results: list = []
    first = _post_in_thread(server.url, LONG, results)
    time.sleep(0.5)  # let it reach the worker
    second = _post_in_thread(server.url, {**LONG, "max_tokens": 4}, results)
    time.sleep(0.3)
    r = client.post("/completions", json={**LONG, "max_tokens": 4})
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    validate("error", r.json())
    assert r.json()["error"]["code"] == "queue_full"
    # other models are not affected while slow is saturated
    assert client.post("/completions", json={"model": "succ", "prompt": "x"}).status_code == 200
    first.join(120)
    second.join(120)
    assert [x.status_code for x in results] == [200, 200]
    assert results[0].json()["usage"]["completion_tokens"] > 0


def test_disconnect_stops_the_generation(server, client):
    """A client that goes away frees its worker within a token, so the next request runs at once."""
    full = time.monotonic()
    r = client.post("/completions", json={**LONG, "max_tokens": 600})
    full = time.monotonic() - full
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 600

    with httpx.stream("POST", server.url + "/completions", json={**LONG, "stream": True},
                      timeout=60) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                break
    # the 1800-token stream was abandoned after its first event; the worker must be free now
    t0 = time.monotonic()
    r = client.post("/completions", json={**LONG, "max_tokens": 4})
    waited = time.monotonic() - t0
    assert r.status_code == 200
    # finishing the abandoned stream would take ~3x the 600-token request; a cancelled one ~nothing
    assert waited < full, f"next request waited {waited:.2f}s; 600 tokens take {full:.2f}s"


def test_queued_request_dropped_when_client_leaves(server, client):
    results: list = []
    first = _post_in_thread(server.url, {**LONG, "max_tokens": 600}, results)
    time.sleep(0.3)
    try:  # this one waits in the queue, then gives up
        httpx.post(server.url + "/completions", json={**LONG, "max_tokens": 1800}, timeout=0.3)
    except httpx.TimeoutException:
        pass
    first.join(120)
    # the abandoned request must not occupy the worker: a new one is served right away
    t0 = time.monotonic()
    r = client.post("/completions", json={**LONG, "max_tokens": 4})
    assert r.status_code == 200
    assert time.monotonic() - t0 < 2.0


def test_request_larger_than_the_queue_can_ever_hold_is_400(client):
    """slow has 1 worker + 1 queue slot: n=3 could never be taken, so retrying is pointless."""
    r = client.post("/completions", json={"model": "slow", "prompt": "x", "n": 3, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    validate("error", r.json())
    assert client.post("/completions", json={"model": "slow", "prompt": "x", "n": 2,
                                             "max_tokens": 2}).status_code == 200
