"""Batched decode steps on modern ggml vs ctransformers single stream, on one GPT-J file.

python -m benchmarks.batched_step [--threads 2] [--batches 1,2,4,8,16] [--steps 16] [--reps 3] [--context 32]

Writes (once, cached in benchmarks/.cache/models) a 2048 x 16 q4_0 GPT-J (--size, --ftype to change)
with the project's writer, then measures in this one process: ctransformers (backends.engine.Engine)
decoding one stream, and backends.batched decoding B streams per step, each stream at its own position
after a prompt of about `--context` tokens. Ratios are against ctransformers and against batched B=1 from the same run.
Also prints other processes' CPU share during the run (ggml's threads spin: busy cores distort it).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from dataclasses import replace

import numpy as np

from benchmarks.common import BIG, _system_busy, busy_share, ensure_model, log


class Others:
    """CPU share (of all cores) used by other processes while a block runs: machine busy minus ours."""

    def __enter__(self) -> "Others":
        self.t, self.busy, self.ours = time.monotonic(), _system_busy(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self.t
        others = (_system_busy() - self.busy) - (time.process_time() - self.ours)
        self.share = max(0.0, others) / (wall * (os.cpu_count() or 1))


def bench_ctransformers(path: str, threads: int, prompt: list[int], steps: int, reps: int) -> float:
    """Tokens/s of ctransformers decoding one stream (greedy argmax over its logits), best of `reps`."""
    from backends.engine import Engine

    eng = Engine(path, threads=threads, batch_size=32)
    try:
        best = 0.0
        for _ in range(reps):
            eng.prefill(prompt, reuse=True)  # later reps reuse the cached prompt
            tok = int(np.argmax(eng.logits()))
            eng._eval([tok])  # warm-up step
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = int(np.argmax(eng.logits()))
                eng._eval([tok])
            best = max(best, steps / (time.perf_counter() - t0))
        return best
    finally:
        del eng
        gc.collect()


def bench_batched(engine, batch: int, prompt: list[int], steps: int, reps: int) -> tuple[float, float]:
    """(tokens/s, ms per step) of `batch` streams decoded together at staggered positions, best of `reps`."""
    best = float("inf")
    for _ in range(reps):
        toks = []
        for s in range(batch):
            mine = prompt[: len(prompt) - s % 4]  # streams at different positions
            start = len(mine) - 1 if engine.length(s) >= len(mine) else 0  # reuse the cached prompt
            logits = engine.prefill(s, mine[start:], start=start)
            toks.append(int(np.argmax(logits)))
        logits = engine.decode(list(enumerate(toks)))  # warm-up (builds the graph once)
        t0 = time.perf_counter()
        for _ in range(steps):
            toks = [int(t) for t in np.argmax(logits, axis=1)]
            logits = engine.decode(list(enumerate(toks)))
        best = min(best, time.perf_counter() - t0)
    return batch * steps / best, 1000 * best / steps


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="timed blocks per point; the best is reported")
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--no-repack", action="store_true", help="keep plain layouts (to see what repacking buys)")
    ap.add_argument("--ftype", default=BIG.ftype, help="weight type of the model file (default q4_0)")
    ap.add_argument("--size", default=f"{BIG.n_embd}x{BIG.n_layer}", help="n_embd x n_layer (default 2048x16)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    n_embd, n_layer = (int(x) for x in args.size.split("x"))
    mdef = replace(BIG, n_embd=n_embd, n_layer=n_layer, n_head=n_embd // 128, ftype=args.ftype)

    from backends.batched import BatchedEngine, EngineConfig

    path, meta = ensure_model(mdef)
    path = str(path)
    prompt = [int(t) for t in np.random.default_rng(3).integers(300, BIG.n_vocab, args.context)]
    log(f"model {path} ({meta['file_bytes'] / 2**20:.0f} MiB)")
    busy_before = busy_share()

    with Others() as ct_others:
        ct_before = bench_ctransformers(path, args.threads, prompt, args.steps, args.reps)
    log(f"ctransformers single stream: {ct_before:.1f} tok/s (others {ct_others.share:.0%})")
    cfg = EngineConfig(n_slots=max(batches), n_ctx=args.context + args.steps + 8, threads=args.threads,
                       repack=not args.no_repack)
    rows = []
    with BatchedEngine(path, cfg) as engine:
        log(engine.weights.report.describe())
        for b in batches:
            with Others() as others:
                rate, ms = bench_batched(engine, b, prompt, args.steps, args.reps)
            rows.append((b, rate, ms, others.share))
            log(f"batched B={b}: {rate:.1f} tok/s ({ms:.1f} ms/step, others {others.share:.0%})")
    with Others() as ct_others_after:  # measured again after: the best of both is the reference
        ct_after = bench_ctransformers(path, args.threads, prompt, args.steps, args.reps)
    log(f"ctransformers single stream again: {ct_after:.1f} tok/s (others {ct_others_after.share:.0%})")
    ct = max(ct_before, ct_after)
    busy_after = busy_share()

    single = rows[0][1] if rows[0][0] == 1 else None
    print(f"\n{args.size} {args.ftype}, {args.threads} threads, context ~{args.context}, best of {args.reps} x "
          f"{args.steps} steps per point; repack {'off' if args.no_repack else 'on'}")
    print(f"load: {engine.weights.report.describe()}")
    print(f"other processes' CPU share before/after: {busy_before:.0%} / {busy_after:.0%}")
    print(f"ctransformers single stream: {ct:.1f} tok/s (best of {ct_before:.1f} before and {ct_after:.1f} after; "
          f"other processes {ct_others.share:.0%} / {ct_others_after.share:.0%} of the CPUs)\n")
    print("| B | tok/s | ms/step | vs ctransformers 1 stream | vs batched B=1 | other processes' CPU |")
    print("|---|---|---|---|---|---|")
    for b, rate, ms, share in rows:
        rel = f"{rate / single:.2f}x" if single else "-"
        print(f"| {b} | {rate:.1f} | {ms:.1f} | {rate / ct:.2f}x | {rel} | {share:.0%} |")


if __name__ == "__main__":
    main()
