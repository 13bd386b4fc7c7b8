"""Both engines through the server on one realistic 2048 x 16 q4_0 file (issue 10, section 3).

One server serves the same file as ctransformers pools (1 worker x all CPUs' threads, and one worker per CPU
x 1 thread) and as the batched engine (`engine: ggml`, `parallel: 8`; `parallel: 16` for the 16-client
point). At 1, 2, 4, 8 and 16 streaming clients, engines alternate per level (ABAB) so drift hits all of
them; each level records aggregate tokens/s, TTFT, per-stream decode rate, other processes' CPU use and
the resident memory of the server and of the engine processes that ran it (sampled from /proc).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import common as c
from benchmarks.clients import client_level
from benchmarks.joining import join_level
from benchmarks.procmem import ProcSampler

LEVELS = [1, 2, 4, 8, 16]
MEMORY_AT = 8  # the level whose peak RSS is compared with weights + KV cache
BATCHED = "ggml-p8"
WIDE = "ggml-p16"  # run at WIDE_LEVELS only (a second batched engine process with 16 slots)
JOIN_BACKGROUND = 7  # running streams a probe request joins (with it: 8 clients)
JOIN_BACKGROUND_TOKENS = 512  # long enough to outlast a probe
JOIN_PROBE_TOKENS = 8
WIDE_LEVELS = [16]


def usable_cpus() -> int:
    """CPUs this process may run on (the server gets exactly these engine threads, so none oversubscribe)."""
    from backends.registry import usable_cpus as cpus

    return cpus()


def entries(path: Path, cpus: int) -> dict[str, dict]:
    """Registry entries by id: the ctransformers pool shapes and the batched engine, all on `path`."""
    out = {f"ct-1x{cpus}": {"engine": "ctransformers", "workers": 1, "threads": cpus}}
    if cpus > 1:
        out[f"ct-{cpus}x1"] = {"engine": "ctransformers", "workers": cpus, "threads": 1}
    out[BATCHED] = {"engine": "ggml", "parallel": 8, "workers": 1, "threads": cpus}
    out[WIDE] = {"engine": "ggml", "parallel": 16, "workers": 1, "threads": cpus}
    return {k: {"id": k, "path": str(path), **v} for k, v in out.items()}


def memory_budget(path: Path, meta: dict, slots: int) -> dict:
    """Weights (file size) and KV cache bytes for `slots` sequences of the file's full context.

    The KV cache is the batched engine's own figure (backends.batched.engine.memory_needed) when it can be
    read, else slots x n_ctx x 2 (K and V) x n_layer x n_embd x 2 bytes (f16).
    """
    formula = slots * meta["n_ctx"] * 2 * meta["n_layer"] * meta["n_embd"] * 2
    out = {"slots": slots, "weights_bytes": meta["file_bytes"], "kv_formula_bytes": formula,
           "kv_bytes": formula, "kv_source": "formula"}
    try:
        from backends.batched.engine import EngineConfig, memory_needed

        need = memory_needed(str(path), EngineConfig(n_slots=slots))
        out |= {"kv_bytes": need["kv_cache"], "kv_source": "memory_needed", "engine_weights_bytes": need["weights"]}
    except Exception as exc:  # noqa: BLE001 - the formula stands in; say why
        out["kv_error"] = f"{type(exc).__name__}: {exc}"
    out["budget_mib"] = round((out["weights_bytes"] + out["kv_bytes"]) / 2**20, 1)
    return out


def schedule(ids: list[str], rep: int) -> list[tuple[int, list[str]]]:
    """(clients, engine ids in the order to run them) per level; the order flips every level and every rep."""
    plan = []
    for i, k in enumerate(LEVELS):
        here = [m for m in ids if m != WIDE or k in WIDE_LEVELS]
        plan.append((k, here if (rep + i) % 2 == 0 else here[::-1]))
    return plan


def measure(port: int, pid: int, model_id: str, k: int, each: int, n: int, eos: int,
            prompts: c.Prompts) -> dict:
    """One level of one engine, with other processes' CPU use and the RSS of the processes that ran it."""
    with c.Contention() as busy, ProcSampler(pid) as mem:
        r = client_level(port, model_id, k, each, n, eos, prompts)
    return r | {"others": busy.result, "memory": mem.result}


def sweep(port: int, pid: int, ids: list[str], n: int, per_client: int, min_requests: int, reps: int,
          eos: int, prompts: c.Prompts) -> dict[str, dict[int, list[dict]]]:
    """Every engine at every level, `reps` times, in the alternating order of `schedule`."""
    runs: dict[str, dict[int, list[dict]]] = {m: {} for m in ids}
    for m in ids:  # warm-up: loads pages, builds the batched engine's first graphs
        client_level(port, m, 2, 1, n, eos, prompts)
    for rep in range(reps):
        for k, order in schedule(ids, rep):
            each = max(per_client, -(-min_requests // k))
            for m in order:
                r = measure(port, pid, m, k, each, n, eos, prompts)
                runs[m].setdefault(k, []).append(r)
                c.log(f"  {m} x{k}: {_f(r['tok_s'])} tok/s, ttft p50 {_f(_ms(c.median(r['ttft'])), '.0f')} ms, "
                      f"others {r['others']['foreign_share']:.0%}, RSS server+engine "
                      f"{r['memory']['total_peak_mib']} MiB")
    return runs


def derive(runs: dict[str, dict[int, list[dict]]]) -> dict:
    """Per engine and level: medians over reps, percentiles over all requests, worst others' share, peak RSS."""
    out: dict = {}
    for m, levels in runs.items():
        out[m] = {}
        for k, rs in sorted(levels.items()):
            ttft = [t for r in rs for t in r["ttft"]]
            mem = max((r["memory"] for r in rs), key=lambda x: x["total_peak_mib"])
            out[m][str(k)] = {
                "tok_s": c.median([r["tok_s"] for r in rs]), "requests": sum(r["requests"] for r in rs),
                "errors": sum(len(r["errors"]) for r in rs),
                "ttft_p50_ms": _ms(c.percentile(ttft, 50)), "ttft_p95_ms": _ms(c.percentile(ttft, 95)),
                "latency_p50_ms": _ms(c.percentile([t for r in rs for t in r["latency"]], 50)),
                "stream_tok_s_p50": c.percentile([t for r in rs for t in r["stream_tok_s"]], 50),
                "others_share": max(r["others"]["foreign_share"] for r in rs),
                "server_peak_mib": mem["server_peak_mib"], "engine_peak_mib": mem["engine_peak_mib"],
                "total_peak_mib": mem["total_peak_mib"], "engine_processes": len(mem["engine_pids"])}
    return out


def run_engines(prof: dict, tmp: Path, prompts: c.Prompts) -> dict:
    """Start a server with both engines on the 2048 x 16 q4_0 file, sweep it, stop it; the results section."""
    path, meta = c.ensure_model(c.BIG)
    eos = c.eos_id(path)
    cpus = usable_cpus()
    spec = entries(path, cpus)
    registry = c.write_registry(tmp / "registry-engines.yaml", list(spec.values()))
    c.log(f"engines: starting a server with {', '.join(spec)} on {path.name} ({cpus} CPUs)")
    server = c.start(registry, tmp / "server-engines.log", {"GPT4ALL_J_DEFAULT_THREADS": str(cpus)})
    port, pid = c.port_of(server), server.proc.pid
    n, per_client, min_req, reps = (prof[k] for k in ("sweep_tokens", "per_client", "min_requests", "sweep_reps"))
    try:
        with c.Contention() as busy:  # while the server lives: its CPU counts as ours
            runs = sweep(port, pid, list(spec), n, per_client, min_req, reps, eos, prompts)
            c.log(f"engines: TTFT of requests joining {JOIN_BACKGROUND} running streams ({BATCHED})")
            joined = join_level(port, BATCHED, JOIN_BACKGROUND, prof["join_probes"], JOIN_BACKGROUND_TOKENS,
                                JOIN_PROBE_TOKENS, eos, prompts)
            c.log(f"  joined p50 {joined['joined_p50_ms']:.0f} ms vs alone {joined['alone_p50_ms']:.0f} ms "
                  f"({joined['ratio']:.2f}x), others {joined['others_share']:.0%}")
    finally:
        c.stop(server)
        lines = server.logs().splitlines()
    return {"model": meta, "cpus": cpus, "entries": spec, "tokens": n, "per_client": per_client,
            "min_requests": min_req, "reps": reps, "levels": LEVELS, "memory_at": MEMORY_AT,
            "batched": BATCHED, "wide": WIDE, "wide_levels": WIDE_LEVELS,
            "ctransformers": [m for m, e in spec.items() if e["engine"] == "ctransformers"],
            "memory_budget": {BATCHED: memory_budget(path, meta, 8), WIDE: memory_budget(path, meta, 16)},
            "runs": {m: {str(k): v for k, v in lv.items()} for m, lv in runs.items()},
            "derived": derive(runs), "join": joined, "contention": busy.result,
            "server_log_problems": [x for x in lines if "WARNING" in x or "ERROR" in x or "Traceback" in x][-30:]}


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "n/a" if x is None else format(x, fmt)
