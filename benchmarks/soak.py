"""Soak: N sequential requests against a real server; RSS of the server and each worker over time.

    python -m benchmarks.soak --requests 2000

Writes benchmarks/results/soak.json and prints each process's RSS drift relative to its value after
the first 200 requests (the target is within 5%).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import httpx

from tests.e2e.conftest import start_server, stop_server
from tests.models import write_successor

OUT = Path(__file__).parent / "results" / "soak.json"


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> None:
    """Run the soak and write its figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = write_successor(d / "succ.bin")
        (d / "r.yaml").write_text(f"models:\n  - {{id: succ, path: {model}, prompt_template: plain, "
                                  "sampling: {temperature: 0}, workers: 2}\n")
        srv = start_server(d / "r.yaml", d / "server.log", extra_env={"GPT4ALL_J_ACCESS_LOG": "false"})
        try:
            pids = [srv.proc.pid] + httpx.get(srv.base + "/ready").json()["models"]["succ"]["worker_pids"]
            samples = run(srv, pids, args.requests, args.warmup)
        finally:
            stop_server(srv)
    base = samples[0]["rss_kib"]
    last = samples[-1]["rss_kib"]
    drift = {str(p): (last[str(p)] - base[str(p)]) / base[str(p)] for p in pids}
    result = {"requests": args.requests, "warmup": args.warmup, "samples": samples, "drift": drift}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    for i, p in enumerate(pids):
        role = "server" if i == 0 else f"worker {i}"
        print(f"{role:9s} pid {p}: {base[str(p)]} KiB -> {last[str(p)]} KiB ({drift[str(p)] * 100:+.2f}%)")


def run(srv, pids: list[int], total: int, warmup: int) -> list[dict]:
    """Sequential requests (completions and chat, streamed and not), sampling RSS every 200."""
    bodies = [("/completions", {"model": "succ", "prompt": "a", "max_tokens": 20}),
              ("/chat/completions", {"model": "succ", "messages": [{"role": "user", "content": "hello"}]}),
              ("/completions", {"model": "succ", "prompt": "5", "max_tokens": 10, "stream": True})]
    samples = []
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        for i in range(1, total + 1):
            path, body = bodies[i % len(bodies)]
            r = client.post(path, json=body)
            r.raise_for_status()
            if i >= warmup and (i - warmup) % 200 == 0:
                samples.append({"after": i, "rss_kib": {str(p): rss_kib(p) for p in pids}})
    return samples


if __name__ == "__main__":
    main()
