"""The benchmark: our server against the raw engine, measured in the same run (issue 4).

    python -m benchmarks.run [--quick] [--peer] [--only engines]

Single stream (tiny and realistic model), a concurrency sweep for two pool shapes with the raw ceiling,
multi-turn chat TTFT with prefix reuse on and off, both engines (ctransformers pools and the batched ggml
engine) through the server on a 2048 x 16 q4_0 file (benchmarks.engines), and optionally the
llama-cpp-python peer. Every figure that is compared is a ratio of two things measured in this run,
alternating (ABAB), with medians.
Writes benchmarks/results/{results.json,results.md,summary.md,*.png}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import common as c
from benchmarks.clients import client_level
from benchmarks.raw import RawEngine, RawProcs, sequential

LEVELS = [1, 2, 4, 8, 16]
CEILING_AT = 8
PROFILES = {  # tokens x reps for single streams; per-level request counts for the sweep
    "quick": {"tiny": (256, 5), "real": (48, 3), "sweep_tokens": 24, "per_client": 1, "min_requests": 2,
              "sweep_reps": 1, "chat_reps": 1, "chat_answer": 16, "chat_user_words": 60, "turns": 5, "ttft_reps": 10,
              "join_probes": 3},
    "full": {"tiny": (512, 11), "real": (96, 7), "sweep_tokens": 48, "per_client": 1, "min_requests": 4,
             "sweep_reps": 2, "chat_reps": 3, "chat_answer": 32, "chat_user_words": 80, "turns": 5,
             "ttft_reps": 25, "join_probes": 7},
}
class CPU:
    """CPU seconds of this process (client or raw engine), the server process and its workers."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.kids = c.children(server_pid)

    def snap(self) -> tuple[float, float, float]:
        """(this process, server main process, all workers)."""
        return (time.process_time(), c.cpu_seconds(self.pid), sum(c.cpu_seconds(k) for k in self.kids))


def single_stream(port: int, server_pid: int, model_id: str, path: Path, n: int, reps: int,
                  prompts: c.Prompts, threads: int = 2, ttft_reps: int = 10) -> dict:
    """Raw engine vs server (streamed and not), same model/threads/sampling/N, ABAB with medians."""
    raw = RawEngine(path, threads=threads)
    eos = raw.eos
    cpu = CPU(server_pid)
    modes = ["raw", "stream", "json"]
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    spent = {m: [0.0, 0.0, 0.0] for m in modes}

    def once(mode: str) -> dict:
        p = prompts.next()
        if mode == "raw":
            return raw.generate(p, n)
        if mode == "stream":
            r = c.post_stream(port, "/v1/completions", c.completion_body(model_id, p, n, eos))
            r["tokens"] = r["usage"]["completion_tokens"]
            return r
        r = c.post_json(port, "/v1/completions", c.completion_body(model_id, p, n, eos))
        r["tokens"] = r.pop("body")["usage"]["completion_tokens"]
        return r

    for m in modes:  # warm-up
        once(m)
    for i in range(reps):
        for m in modes[i % 3:] + modes[: i % 3]:
            before = cpu.snap()
            r = once(m)
            after = cpu.snap()
            for k in range(3):
                spent[m][k] += after[k] - before[k]
            if r["tokens"] != n:
                raise RuntimeError(f"{m} produced {r['tokens']} tokens, expected {n}")
            rows[m].append({k: r[k] for k in ("ttft", "total", "tokens") if k in r} |
                           {"first_token": r.get("first_token")})
    probe = ttft_probe(port, model_id, raw, ttft_reps, prompts)
    prompt_tokens = len(raw.engine.tokenize(prompts.next()))
    raw.close()
    return {"model": model_id, "tokens": n, "reps": reps, "threads": threads, "runs": rows, "ttft_probe": probe,
            "prompt_tokens": prompt_tokens,
            "cpu_seconds": {m: dict(zip(("this_process", "server_main", "workers"), v))
                            for m, v in spent.items()},
            "derived": derive_single(rows, n)}


def ttft_probe(port: int, model_id: str, raw: RawEngine, reps: int, prompts: c.Prompts) -> dict:
    """TTFT of a short prompt, raw vs streamed server; rep i gives both the same prompt (same cache state)."""
    pairs = []
    for i in range(reps):
        p = prompts.next().split(" ")[0] + " The"
        out = {}
        for side in (("raw", "server") if i % 2 == 0 else ("server", "raw")):
            if side == "raw":
                out["raw"] = raw.generate(p, 4)["ttft"]
            else:
                body = c.completion_body(model_id, p, 4, raw.eos)
                out["server"] = c.post_stream(port, "/v1/completions", body)["ttft"]
        pairs.append(out)
    return {"prompt_tokens": len(raw.engine.tokenize(p)), "reps": reps, "pairs": pairs,
            "raw_ms": c.median([x["raw"] * 1e3 for x in pairs]),
            "server_ms": c.median([x["server"] * 1e3 for x in pairs]),
            "overhead_ms": c.median([(x["server"] - x["raw"]) * 1e3 for x in pairs])}


def derive_single(rows: dict[str, list[dict]], n: int) -> dict:
    """Paired (same rep) ratios and differences, then medians."""
    raw, out = rows["raw"], {}
    out["raw_tok_s"] = c.median([n / r["total"] for r in raw])
    out["raw_ttft_ms"] = c.median([r["ttft"] * 1e3 for r in raw])
    for m in ("stream", "json"):
        srv = rows[m]
        out[f"{m}_tok_s"] = c.median([n / r["total"] for r in srv])
        out[f"{m}_ratio"] = c.median([a["total"] / b["total"] for a, b in zip(raw, srv)])
        out[f"{m}_overhead_us_per_token"] = c.median(
            [(b["total"] - a["total"]) / n * 1e6 for a, b in zip(raw, srv)])
    out["stream_ttft_ms"] = c.median([r["ttft"] * 1e3 for r in rows["stream"]])
    out["ttft_overhead_ms"] = c.median([(b["ttft"] - a["ttft"]) * 1e3 for a, b in zip(raw, rows["stream"])])
    dec = [((n - 1) / (r["total"] - r["ttft"])) for r in raw]
    sdec = [((n - 1) / (r["total"] - r["ttft"])) for r in rows["stream"]]
    out["stream_decode_ratio"] = c.median([b / a for a, b in zip(dec, sdec)])
    return out


def sweep(port: int, shapes: dict[str, str], path: Path, n: int, per_client: int, min_requests: int,
          reps: int, prompts: c.Prompts) -> dict:
    """Concurrency sweep per pool shape, with the raw ceiling (1 proc x 2 threads, 2 procs x 1 thread).

    At each level every client sends max(per_client, ceil(min_requests / clients)) requests back to back.
    """
    raw1 = RawEngine(path, threads=2)
    raw2 = RawProcs(path, procs=2, threads=1)
    eos = raw1.eos
    levels: dict[str, dict[int, list[dict]]] = {s: {k: [] for k in LEVELS} for s in shapes}
    ceiling: dict[str, list[dict]] = {"raw_1x2": [], "raw_2x1": []}
    for shape, model_id in shapes.items():  # warm-up
        client_level(port, model_id, 2, 1, n, eos, prompts)
    raw2.run(prompts.many(2), n)
    for rep in range(reps):
        for k in LEVELS:
            each = max(per_client, -(-min_requests // k))
            if k == CEILING_AT:
                count = CEILING_AT * each
                pair = [("raw_1x2", lambda: sequential(raw1, prompts.many(count), n)),
                        ("raw_2x1", lambda: raw2.run(prompts.many(count), n))]
                for name, fn in (pair if rep % 2 == 0 else pair[::-1]):
                    ceiling[name].append(fn())
                    c.log(f"  raw {name}: {ceiling[name][-1]['tok_s']:.1f} tok/s")
            order = list(shapes.items()) if (rep + k) % 2 == 0 else list(shapes.items())[::-1]
            for shape, model_id in order:
                r = client_level(port, model_id, k, each, n, eos, prompts)
                levels[shape][k].append(r)
                c.log(f"  {shape} x{k}: {r['tok_s']:.1f} tok/s, ttft p50 "
                      f"{c.median(r['ttft']) * 1e3:.0f} ms")
    raw1.close()
    raw2.close()
    return {"tokens": n, "per_client": per_client, "min_requests": min_requests, "reps": reps,
            "levels": LEVELS, "ceiling_at": CEILING_AT,
            "shapes": {s: {"model": m} for s, m in shapes.items()},
            "runs": {s: {str(k): v for k, v in lv.items()} for s, lv in levels.items()},
            "ceiling_runs": ceiling, "derived": derive_sweep(levels, ceiling)}


def derive_sweep(levels: dict, ceiling: dict) -> dict:
    """Median aggregate tok/s per level and latency percentiles over all requests of all reps."""
    out: dict = {"ceiling": {k: c.median([r["tok_s"] for r in v]) for k, v in ceiling.items()}}
    out["ceiling"]["best"] = max(out["ceiling"].values())
    for shape, lv in levels.items():
        rows = {}
        for k, runs in lv.items():
            ttft = [t for r in runs for t in r["ttft"]]
            lat = [t for r in runs for t in r["latency"]]
            rows[str(k)] = {"tok_s": c.median([r["tok_s"] for r in runs]),
                            "errors": sum(len(r["errors"]) for r in runs), "requests": len(lat),
                            **{f"ttft_p{q}_ms": c.percentile(ttft, q) * 1e3 for q in (50, 95, 99)},
                            **{f"latency_p{q}_ms": c.percentile(lat, q) * 1e3 for q in (50, 95, 99)}}
        out[shape] = rows
    return out


def user_message(rep: int, turn: int, words: int) -> str:
    """A deterministic user message of `words` words (different per rep and turn)."""
    rng = random.Random(rep * 100 + turn)
    return " ".join(rng.choice(c.WORDS) for _ in range(words)).capitalize() + "?"


def conversation(port: int, model_id: str, rep: int, turns: int, answer: int, words: int, eos: int) -> list:
    """One chat of `turns` turns with a growing history; TTFT and prompt/cached tokens per turn."""
    messages = [{"role": "system", "content": c.SYSTEM}]
    out = []
    for t in range(turns):
        messages.append({"role": "user", "content": user_message(rep, t, words)})
        body = {"model": model_id, "messages": messages, "max_tokens": answer, "temperature": 0,
                "seed": 0, "logit_bias": {str(eos): -100}}
        r = c.post_stream(port, "/v1/chat/completions", body, collect=True)
        usage = r["usage"] or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        out.append({"turn": t + 1, "ttft": r["ttft"], "total": r["total"], "prompt_tokens":
                    usage.get("prompt_tokens"), "cached_tokens": cached,
                    "completion_tokens": usage.get("completion_tokens")})
        messages.append({"role": "assistant", "content": r["text"]})
    return out


def chat(port: int, ids: dict[str, str], eos: int, turns: int, reps: int, answer: int, words: int) -> dict:
    """Multi-turn chat TTFT per turn with prefix reuse on and off (alternating conversations)."""
    for model_id in ids.values():  # warm-up (a different conversation)
        conversation(port, model_id, -1, 1, answer, words, eos)
    runs: dict[str, list] = {m: [] for m in ids}
    for rep in range(reps):
        for mode in (list(ids) if rep % 2 == 0 else list(ids)[::-1]):
            runs[mode].append(conversation(port, ids[mode], rep, turns, answer, words, eos))
            c.log(f"  chat {mode}: ttft per turn " +
                  " ".join(f"{x['ttft'] * 1e3:.0f}" for x in runs[mode][-1]) + " ms")
    derived = {}
    for mode, convs in runs.items():
        derived[mode] = [{"turn": t + 1, "ttft_ms": c.median([cv[t]["ttft"] * 1e3 for cv in convs]),
                          "prompt_tokens": convs[0][t]["prompt_tokens"],
                          "cached_tokens": convs[0][t]["cached_tokens"]} for t in range(turns)]
    derived["speedup"] = [off["ttft_ms"] / on["ttft_ms"] for on, off in zip(derived["on"], derived["off"])]
    return {"turns": turns, "reps": reps, "answer_tokens": answer, "user_words": words,
            "models": ids, "runs": runs, "derived": derived}


def peer(quick: bool, tokens: int) -> dict:
    """The llama-cpp-python peer comparison, if benchmarks.peer is there and works."""
    try:
        from benchmarks.peer import run_peer
    except Exception as exc:
        return {"status": "missing", "error": f"{type(exc).__name__}: {exc}"}
    try:
        return {"status": "ok", "result": run_peer(concurrency=LEVELS, tokens=tokens, threads=2, quick=quick)}
    except Exception as exc:
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def wait_quiet(limit: float) -> float:
    """Wait (up to limit seconds) for idle CPUs: 2 engine threads on 2 busy cores collapse. Returns the share."""
    deadline = time.monotonic() + limit
    share = c.busy_share()
    while share > 0.1 and time.monotonic() < deadline:
        share = c.busy_share(5)
    if share > 0.1:
        c.log(f"WARNING: {share:.0%} of the {os.cpu_count()} CPUs are busy before the start: other work "
              "competes with the engine threads and the figures will be noisy (2-thread engines can collapse)")
    return share


def registry_entries(tiny: Path, real: Path) -> list[dict]:
    """The served models: tiny 1x2 and 1x1, realistic 1x2 and 2x1, two chat entries (prefix cache on/off)."""
    chat = {"path": str(real), "prompt_template": "gpt4all-j", "workers": 1, "threads": 2}
    return [
        {"id": "tiny-1x1", "path": str(tiny), "workers": 1, "threads": 1},
        {"id": "tiny-1x2", "path": str(tiny), "workers": 1, "threads": 2},
        {"id": "real-1x2", "path": str(real), "workers": 1, "threads": 2},
        {"id": "real-2x1", "path": str(real), "workers": 2, "threads": 1},
        {"id": "chat-on", **chat, "prefix_cache": True},
        {"id": "chat-off", **chat, "prefix_cache": False},
    ]


def run_single(results: dict, contention: dict, name: str, port: int, pid: int, model_id: str, path: Path,
               threads: int, prof: dict, prompts: c.Prompts) -> None:
    """One single-stream phase, stored as results[f"single_{name}"] with its contention figures."""
    n, reps = prof[name.split("_")[0]]
    c.log(f"single stream: {name} ({model_id}), {threads} thread(s), {n} tokens x {reps} reps")
    with c.Contention() as busy:
        results[f"single_{name}"] = single_stream(port, pid, model_id, path, n, reps, prompts, threads,
                                                  prof["ttft_reps"])
    contention[f"single_{name}"] = busy.result
    c.log(f"  {json.dumps(results[f'single_{name}']['derived'])}; other processes: {busy.result}")


def batching_off(results: dict, contention: dict, tiny: Path, tmp: Path, prof: dict, prompts: c.Prompts) -> None:
    """The tiny single streams again on a server with token batching off (--token-batch-ms 0)."""
    entries = [{"id": "tiny-1x1", "path": str(tiny), "workers": 1, "threads": 1},
               {"id": "tiny-1x2", "path": str(tiny), "workers": 1, "threads": 2}]
    registry = c.write_registry(tmp / "registry-nobatch.yaml", entries)
    c.log("starting a server with token batching off")
    server = c.start(registry, tmp / "server-nobatch.log", {"GPT4ALL_J_TOKEN_BATCH_MS": "0"})
    try:
        for name, model_id, threads in (("tiny_nobatch", "tiny-1x1", 1), ("tiny_2t_nobatch", "tiny-1x2", 2)):
            run_single(results, contention, name, c.port_of(server), server.proc.pid, model_id, tiny, threads,
                       prof, prompts)
    finally:
        c.stop(server)


def classic(results: dict, contention: dict, prof: dict, tmp: Path, prompts: c.Prompts) -> None:
    """Issue 4's phases: single streams, the pool sweep with the raw ceiling, chat, token batching off."""
    tiny, tiny_meta = c.ensure_model(c.TINY)
    real, real_meta = c.ensure_model(c.REAL)
    results["models"] |= {"tiny": tiny_meta, "real": real_meta}
    eos_real = c.eos_id(real)
    registry = c.write_registry(tmp / "registry.yaml", registry_entries(tiny, real))
    c.log("starting the server")
    server = c.start(registry, tmp / "server.log")
    port, pid = c.port_of(server), server.proc.pid
    try:
        # The tiny model's headline is 1 worker x 1 thread vs the raw engine on 1 thread: the server's
        # own per-token cost. tiny_2t (1 x 2 vs raw 2 threads) shows ggml's two spinning threads
        # competing with the server and the client for 2 cores.
        for name, model_id, threads in (("tiny", "tiny-1x1", 1), ("tiny_2t", "tiny-1x2", 2),
                                        ("real", "real-1x2", 2)):
            path = real if name == "real" else tiny
            run_single(results, contention, name, port, pid, model_id, path, threads, prof, prompts)
        c.log("concurrency sweep")
        with c.Contention() as busy:
            results["sweep"] = sweep(port, {"1x2": "real-1x2", "2x1": "real-2x1"}, real,
                                     prof["sweep_tokens"], prof["per_client"], prof["min_requests"],
                                     prof["sweep_reps"], prompts)
        contention["sweep"] = busy.result
        c.log(f"multi-turn chat (other processes during the sweep: {busy.result})")
        with c.Contention() as busy:
            results["chat"] = chat(port, {"on": "chat-on", "off": "chat-off"}, eos_real, prof["turns"],
                                   prof["chat_reps"], prof["chat_answer"], prof["chat_user_words"])
        contention["chat"] = busy.result
        c.log(f"other processes during the chat: {busy.result}")
    finally:
        c.stop(server)
        lines = server.logs().splitlines()
        results["server_log_problems"] = [x for x in lines if "WARNING" in x or "ERROR" in x
                                          or "Traceback" in x][-30:]
    batching_off(results, contention, tiny, tmp, prof, prompts)


def engines(results: dict, contention: dict, prof: dict, tmp: Path, prompts: c.Prompts) -> None:
    """Both engines through the server on the 2048 x 16 q4_0 file (issue 10)."""
    from benchmarks.engines import run_engines

    c.log("engines: ctransformers pools vs the batched engine")
    results["engines"] = run_engines(prof, tmp, prompts)
    results["models"]["big"] = results["engines"]["model"]
    contention["engines"] = results["engines"]["contention"]
    c.log(f"other processes during the engines sweep: {contention['engines']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer reps, shorter generations")
    ap.add_argument("--peer", action="store_true", help="also run the llama-cpp-python peer comparison")
    ap.add_argument("--only", choices=["engines", "classic"], default=None,
                    help="run only the engines sweep (issue 10) or only the other phases (issue 4)")
    ap.add_argument("--out", type=Path, default=c.RESULTS, help="results folder")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="first wait up to this long for the CPUs to be at least 90%% idle")
    return ap.parse_args(argv)


DERIVED = {"meta", "targets", "engine_targets", "plots", "peer"}  # rebuilt by every run


def keep_other_sections(results: dict, previous: Path) -> None:
    """With --only: carry over the sections this run did not measure from the previous results.json, so the
    report keeps them (meta.sections_from says which run each came from)."""
    try:
        old = json.loads(previous.read_text())
    except (OSError, ValueError):
        return
    carried = [k for k in old if k not in results and k not in DERIVED]
    for k in carried:
        results[k] = old[k]
    for k, v in old.get("contention", {}).items():
        results["contention"].setdefault(k, v)
    for k, v in old.get("models", {}).items():
        results["models"].setdefault(k, v)
    if old.get("peer", {}).get("status") != "skipped" and results["peer"].get("status") == "skipped":
        results["peer"], carried = old["peer"], carried + ["peer"]
    results["meta"]["sections_from"] = {"this run": sorted(set(results) - set(carried) - DERIVED),
                                        old.get("meta", {}).get("date", "previous run"): sorted(carried)}


def main(argv: list[str] | None = None) -> dict:
    """Run the phases asked for and write the results."""
    from benchmarks import report

    args = parse_args(argv)
    busy_before = wait_quiet(args.wait_quiet)
    prof = PROFILES["quick" if args.quick else "full"]
    started = time.monotonic()
    results: dict = {"meta": c.metadata() | {"mode": "quick" if args.quick else "full", "profile": prof,
                                             "only": args.only, "cpu_busy_share_before": round(busy_before, 3)},
                     "models": {}}
    prompts = c.Prompts()
    contention: dict = {}
    results["contention"] = contention
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server is stopped on SIGTERM too
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        if args.only != "engines":
            classic(results, contention, prof, Path(tmp), prompts)
        if args.only != "classic":
            engines(results, contention, prof, Path(tmp), prompts)
    if args.peer:
        c.log("peer comparison")
        results["peer"] = peer(args.quick, prof["sweep_tokens"])
    else:
        results["peer"] = {"status": "skipped", "error": "run with --peer"}
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    results["meta"]["load_average_end"] = list(os.getloadavg())
    if args.only:
        keep_other_sections(results, args.out / "results.json")
    summary = report.write_all(results, args.out)
    print(summary)
    return results


if __name__ == "__main__":
    main()
