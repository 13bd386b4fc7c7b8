"""The raw engine, without the server: in-process (one engine) and in worker processes run at once."""

from __future__ import annotations

import codecs
import gc
import multiprocessing as mp
import time

_SPAWN = mp.get_context("spawn")


def sampling(eos: int):
    """Greedy sampling with EOS banned, as the server maps temperature=0 and logit_bias={eos: -100}."""
    from backends.types import SamplingParams

    return SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, last_n_tokens=64,
                          logit_bias={eos: -100.0}, seed=0)


def run_job(engine, prompt: str, n: int, eos: int, job_id: int = 1) -> dict:
    """Generate exactly n tokens; time to the first token, to the first visible text, and in total."""
    from backends.types import Failed, GenerationJob, Tokens

    job = GenerationJob(job_id=job_id, prompt=prompt, max_tokens=n, sampling=sampling(eos))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tokens = 0
    first = ttft = None
    t0 = time.monotonic()
    for event in engine.run(job, lambda: False):
        if isinstance(event, Tokens):
            tokens += len(event.ids)
            if ttft is None:
                now = time.monotonic()
                first = first if first is not None else now - t0
                if decoder.decode(b"".join(event.pieces)):
                    ttft = now - t0
        elif isinstance(event, Failed):
            raise RuntimeError(f"raw engine failed: {event.message}")
    total = time.monotonic() - t0
    return {"t0": t0, "first_token": first, "ttft": ttft, "total": total, "tokens": tokens}


class RawEngine:
    """One engine loaded in this process (same threads and batch size as a server worker)."""

    def __init__(self, path, threads: int, batch_size: int = 8) -> None:
        from backends.engine import Engine

        self.engine = Engine(str(path), threads=threads, batch_size=batch_size)
        self.eos = self.engine.eos
        self._ids = 0

    def generate(self, prompt: str, n: int) -> dict:
        """One timed generation of exactly n tokens."""
        self._ids += 1
        return run_job(self.engine, prompt, n, self.eos, self._ids)

    def close(self) -> None:
        """Free the engine (only one engine per process at a time: ctransformers shares scratch memory)."""
        self.engine = None
        gc.collect()


def _proc_main(conn, path: str, threads: int, batch_size: int) -> None:
    """A raw engine process: load, then run batches of prompts on request."""
    from backends.engine import Engine

    engine = Engine(path, threads=threads, batch_size=batch_size)
    conn.send(("ready", engine.eos))
    job_id = 0
    while True:
        kind, payload = conn.recv()
        if kind == "exit":
            return
        prompts, n = payload
        out = []
        for prompt in prompts:
            job_id += 1
            out.append(run_job(engine, prompt, n, engine.eos, job_id))
        conn.send(("done", out))


class RawProcs:
    """Several raw engine processes generating at the same time (the raw form of a multi-worker pool)."""

    def __init__(self, path, procs: int, threads: int, batch_size: int = 8) -> None:
        self.conns, self.procs = [], []
        for _ in range(procs):
            parent, child = _SPAWN.Pipe()
            p = _SPAWN.Process(target=_proc_main, args=(child, str(path), threads, batch_size), daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        for c in self.conns:
            kind, _ = c.recv()
            if kind != "ready":
                raise RuntimeError("raw engine process failed to load")

    def run(self, prompts: list[str], n: int) -> dict:
        """Split prompts round-robin over the processes, run them all at once; aggregate tokens/s."""
        shares = [prompts[i :: len(self.conns)] for i in range(len(self.conns))]
        for c, share in zip(self.conns, shares):
            c.send(("run", (share, n)))
        results = [r for c in self.conns for r in c.recv()[1]]
        start = min(r["t0"] for r in results)
        end = max(r["t0"] + r["total"] for r in results)
        tokens = sum(r["tokens"] for r in results)
        return {"tokens": tokens, "seconds": end - start, "tok_s": tokens / (end - start)}

    def close(self) -> None:
        """Stop the processes (their CPU time is noted first, for the contention accounting)."""
        from benchmarks.common import EXITED_CPU, cpu_seconds

        for p in self.procs:
            try:
                EXITED_CPU[0] += cpu_seconds(p.pid)
            except OSError:
                pass
        for c in self.conns:
            try:
                c.send(("exit", None))
            except OSError:
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


def sequential(raw: RawEngine, prompts: list[str], n: int) -> dict:
    """Run prompts one after another on one in-process engine; aggregate tokens/s."""
    results = [raw.generate(p, n) for p in prompts]
    start = results[0]["t0"]
    end = results[-1]["t0"] + results[-1]["total"]
    tokens = sum(r["tokens"] for r in results)
    return {"tokens": tokens, "seconds": end - start, "tok_s": tokens / (end - start)}
