"""Load and soak: many more streaming clients than workers; memory stays flat over many requests."""

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import start_server, stop_server

CLIENTS = 200


@pytest.fixture(scope="module")
def two_workers(model_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("load")
    registry = d / "registry.yaml"
    registry.write_text(f"models:\n  - {{id: succ, path: {model_files['succ']}, prompt_template: plain, "
                        f"sampling: {{temperature: 0}}, workers: 2, max_queue: 100}}\n")
    srv = start_server(registry, d / "server.log", extra_env={"GPT4ALL_J_ACCESS_LOG": "false"})
    yield srv
    stop_server(srv)


async def _one_stream(client: httpx.AsyncClient, url: str) -> tuple[int, str | None]:
    body = {"model": "succ", "prompt": "a", "max_tokens": 20, "stream": True}
    async with client.stream("POST", url + "/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None
        payloads = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    text = "".join(json.loads(p)["choices"][0]["text"] for p in payloads[:-1])
    return 200, text


async def _storm(srv) -> tuple[list, list[float]]:
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=CLIENTS + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        tasks = [asyncio.create_task(_one_stream(client, srv.url)) for _ in range(CLIENTS)]
        health: list[float] = []
        while not all(t.done() for t in tasks):
            t0 = time.monotonic()
            r = await client.get(srv.base + "/health")
            assert r.status_code == 200
            health.append(time.monotonic() - t0)
            await asyncio.sleep(0.05)
        return [t.result() for t in tasks], health


def test_200_streaming_clients_on_2_workers(two_workers):
    results, health = asyncio.run(asyncio.wait_for(_storm(two_workers), timeout=180))
    statuses = [s for s, _ in results]
    completed = [t for s, t in results if s == 200]
    assert set(statuses) <= {200, 503}, statuses
    assert all(t == "bcdefghijklmnopqrstu" for t in completed)
    assert len(completed) >= 100  # the queue holds 100 behind 2 workers
    assert health and max(health) < 2.0, max(health)
    print(f"\nload: {len(completed)} completed, {statuses.count(503)} got 503, "
          f"/health max {max(health) * 1000:.0f} ms over {len(health)} probes")
    # afterwards it serves as usual
    r = httpx.post(two_workers.url + "/completions", json={"model": "succ", "prompt": "x"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "yz"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_short_soak_memory_stays_flat(two_workers):
    """300 sequential requests after a 200-request warm-up: every process within 5% of its RSS."""
    pids = [two_workers.proc.pid] + [
        p for m in httpx.get(two_workers.base + "/ready").json()["models"].values() for p in m["worker_pids"]]
    bodies = [{"model": "succ", "prompt": "a", "max_tokens": 20},
              {"model": "succ", "messages": [{"role": "user", "content": "hello"}]}]
    paths = ["/completions", "/chat/completions"]
    with httpx.Client(base_url=two_workers.url, timeout=30) as client:
        def burst(n: int) -> None:
            for i in range(n):
                assert client.post(paths[i % 2], json=bodies[i % 2]).status_code == 200

        burst(200)
        before = {p: rss_kib(p) for p in pids}
        burst(300)
        after = {p: rss_kib(p) for p in pids}
    drift = {p: (after[p] - before[p]) / before[p] for p in pids}
    print(f"\nsoak RSS drift: " + ", ".join(f"{p}: {d * 100:+.2f}%" for p, d in drift.items()))
    assert all(abs(d) <= 0.05 for d in drift.values()), drift
