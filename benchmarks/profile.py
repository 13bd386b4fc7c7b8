"""Where the per-token time goes: py-spy samples of the server process and its worker during streams.

    python -m benchmarks.profile [--seconds 20]

Streams greedy completions of the tiny model (1 worker x 1 thread) back to back while py-spy samples
the server's main process and the worker (native frames off; idle time excluded, so shares are of
the time each process spends running). Writes benchmarks/results/profile.md (top functions by own
time and by inclusive time) as profile-MODEL-Nt.md, and the raw collapsed stacks next to it.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import common as c



def collapsed(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw output: one 'frame;frame;... count' line per distinct stack."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _short(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"; line numbers split one function into many
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rstrip(')').rsplit(':', 1)[0]).name})" if where else name


def top(stacks: list[tuple[list[str], int]], n: int = 15) -> tuple[int, list, list]:
    """(samples, top functions by own samples, top functions by inclusive samples)."""
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for frames, count in stacks:
        frames = [_short(f) for f in frames]
        total += count
        own[frames[-1]] += count
        for f in set(frames[1:]):  # the first frame is the thread/process label
            incl[f] += count
    return total, own.most_common(n), incl.most_common(n)


def _table(title: str, total: int, rows: list, seconds: float, tokens: int) -> list[str]:
    out = [f"#### {title}", "", "| function | share of samples | µs per token |", "| --- | --- | --- |"]
    per_sample_us = seconds / total * 1e6 if total else 0
    for name, count in rows:
        out.append(f"| `{name}` | {count / total:.1%} | {count * per_sample_us / max(tokens, 1):.1f} |")
    return out + [""]


def stream_until(port: int, eos: int, stop: threading.Event, prompts: c.Prompts, counter: list[int]) -> None:
    """Back-to-back streamed completions of 64 tokens until told to stop."""
    while not stop.is_set():
        r = c.post_stream(port, "/v1/completions", c.completion_body("tiny", prompts.next(), 64, eos))
        counter[0] += r["usage"]["completion_tokens"]


def main(argv: list[str] | None = None) -> None:
    """Profile the server and its worker; write profile.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--model", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    tiny, _ = c.ensure_model(c.TINY if args.model == "tiny" else c.REAL)
    eos = c.eos_id(tiny)
    prompts = c.Prompts()
    with tempfile.TemporaryDirectory(prefix="prof-") as tmp:
        registry = c.write_registry(Path(tmp) / "r.yaml", [{"id": "tiny", "path": str(tiny), "workers": 1,
                                                            "threads": args.threads}])
        server = c.start(registry, Path(tmp) / "server.log")
        try:
            port, pid = c.port_of(server), server.proc.pid
            worker = next(k for k in c.children(pid)
                          if b"resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes())
            c.post_stream(port, "/v1/completions", c.completion_body("tiny", prompts.next(), 64, eos))
            stop, counter = threading.Event(), [0]
            client = threading.Thread(target=stream_until, args=(port, eos, stop, prompts, counter))
            client.start()
            time.sleep(0.5)
            counter[0] = 0
            out = c.RESULTS / f"profile-{args.model}-{args.threads}t"
            spies = {name: subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--nonblocking", "-f", "raw",
                                             "-r", str(args.rate), "-d", str(int(args.seconds)), "-o",
                                             f"{out}-{name}.txt", "-p", str(p)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for name, p in (("server", pid), ("worker", worker))}
            for spy in spies.values():
                spy.wait()
            tokens = counter[0]
            stop.set()
            client.join()
        finally:
            c.stop(server)
    lines = ["# Profile of the per-token path", "",
             f"`python -m benchmarks.profile --seconds {args.seconds:g} --model {args.model} --threads {args.threads}`: "
             f"the {args.model} model (1 worker x {args.threads} thread(s)) "
             f"streaming back to back; {tokens} tokens in {args.seconds:g} s ({tokens / args.seconds:.0f} tok/s); "
             f"py-spy --nonblocking at {args.rate} Hz, idle samples excluded. µs per token = share x sampled time / tokens "
             "(an upper bound when the process was not busy the whole time).", ""]
    for name in ("server", "worker"):
        total, own, incl = top(collapsed(Path(f"{out}-{name}.txt")))
        busy_s = total / args.rate
        lines += [f"### {name} process: {total} busy samples ({busy_s:.2f} s busy of {args.seconds:g} s, "
                  f"{busy_s / max(tokens, 1) * 1e6:.0f} µs busy per token)", ""]
        lines += _table("own time", total, own, busy_s, tokens)
        lines += _table("inclusive time", total, incl, busy_s, tokens)
    Path(f"{out}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
