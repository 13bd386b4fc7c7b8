"""The engines section of the report: issue 10's targets, the per-level table and the two sweep plots."""

from __future__ import annotations

from pathlib import Path


def _f(x, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def best_ctransformers(eng: dict) -> tuple[str | None, str | None, float | None]:
    """(pool shape, clients, aggregate tok/s) of the best ctransformers configuration at any level."""
    d = eng["derived"]
    found = [(m, k, r["tok_s"]) for m in eng["ctransformers"] for k, r in d.get(m, {}).items()
             if r["tok_s"] is not None]
    return max(found, key=lambda x: x[2]) if found else (None, None, None)


def engine_targets(res: dict) -> list[dict]:
    """Issue 10's benchmark targets: figure, goal, met or not, and other processes' CPU share behind each."""
    eng = res.get("engines")
    if not eng:
        return []
    d, b, at = eng["derived"], eng["batched"], str(eng["memory_at"])
    one, eight = d[b].get("1", {}), d[b].get(at, {})
    ct_shape, ct_k, ct_best = best_ctransformers(eng)
    ct_single = max((d[m]["1"] for m in eng["ctransformers"] if d.get(m, {}).get("1", {}).get("tok_s")),
                    key=lambda r: r["tok_s"], default={})
    budget = eng["memory_budget"][b]
    out = []

    def add(name: str, value, op: str, limit: float, others: list[float | None], basis: str) -> None:
        ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
        shares = [s for s in others if s is not None]
        out.append({"target": name, "value": value, "op": op, "limit": limit, "unit": "x", "pass": ok,
                    "others_share": max(shares) if shares else None, "basis": basis})

    add(f"aggregate tok/s, {at} streaming clients vs 1 client ({b})", _ratio(eight.get("tok_s"), one.get("tok_s")),
        ">=", 3, [eight.get("others_share"), one.get("others_share")], "median aggregates, same server")
    add(f"aggregate tok/s, {at} clients ({b}) vs best ctransformers pool ({ct_shape} at {ct_k} clients)",
        _ratio(eight.get("tok_s"), ct_best), ">=", 3,
        [eight.get("others_share"), (d.get(ct_shape or "", {}).get(ct_k or "", {})).get("others_share")],
        "median aggregate / best median aggregate of any pool shape at any level")
    add("single stream tok/s vs ctransformers, same file", _ratio(one.get("tok_s"), ct_single.get("tok_s")),
        ">=", 1.1, [one.get("others_share"), ct_single.get("others_share")],
        "1-client aggregates (prompt + decode) through the server; ctransformers = best pool shape")
    add(f"p50 TTFT, {at} clients arriving at once vs 1 client ({b})", _ratio(eight.get("ttft_p50_ms"), one.get("ttft_p50_ms")),
        "<=", 2, [eight.get("others_share"), one.get("others_share")], "p50 over all requests of all reps")
    join = eng.get("join")
    if join:
        add(f"p50 TTFT of a request joining {join['background']} running streams vs alone ({b})", join["ratio"],
            "<=", 2, [join["others_share"]], f"{join['probes']} probes, alternating alone / joined, "
            f"{join['joined_p50_ms']:.0f} vs {join['alone_p50_ms']:.0f} ms")
    add(f"server + engine RSS at {at} streams vs weights + KV cache ({budget['budget_mib']:.0f} MiB)",
        _ratio(eight.get("total_peak_mib"), budget["budget_mib"]), "<=", 1.2, [eight.get("others_share")],
        f"peak of sampled VmRSS sums; KV cache from {budget['kv_source']}")
    return out


def targets_md(res: dict) -> list[str]:
    """The "engines" table: every issue 10 target with its figure and whether it was met."""
    rows = engine_targets(res)
    if not rows:
        return []
    eng = res["engines"]
    m = eng["model"]
    out = [(f"Engines ({m['n_embd']} x {m['n_layer']} {m['ftype']}, {m['file_bytes'] / 2**20:.0f} MiB; "
            f"{eng['cpus']} engine threads per busy entry; {eng['tokens']} tokens per request, {eng['reps']} reps):"),
           "", "| target | measured | goal | met | others' CPU |", "| --- | --- | --- | --- | --- |"]
    for t in rows:
        met = "n/a" if t["pass"] is None else ("yes" if t["pass"] else "no")
        out.append(f"| {t['target']} | {_f(t['value'], '.2f')}x | {t['op']} {t['limit']:g}x | {met} | "
                   f"{_f(None if t['others_share'] is None else t['others_share'] * 100, '.0f')}% |")
    return out


def sweep_md(res: dict) -> list[str]:
    """Per engine and level: aggregate, TTFT, per-stream rate, RSS and other processes' CPU."""
    eng = res.get("engines")
    if not eng:
        return []
    d = eng["derived"]
    each = f"max({eng['per_client']}, ceil({eng['min_requests']} / clients))"
    out = [(f"### Engines sweep ({eng['tokens']} tokens per request, each client sends {each} requests, "
            f"{eng['reps']} reps, engines alternating per level)"), ""]
    for m, mb in eng["memory_budget"].items():
        out.append(f"- {m}: weights {mb['weights_bytes'] / 2**20:.0f} MiB (file) + KV cache "
                   f"{mb['kv_bytes'] / 2**20:.0f} MiB ({mb['slots']} slots, {mb['kv_source']}) = "
                   f"{mb['budget_mib']:.0f} MiB")
    out += ["", ("| engine | clients | aggregate tok/s | TTFT p50 / p95 ms | per-stream tok/s p50 | latency p50 ms | "
                 "RSS server + engine MiB (engine procs) | errors | others' CPU |"),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, levels in d.items():
        for k, r in levels.items():
            out.append(f"| {m} | {k} | {_f(r['tok_s'], '.1f')} | {_f(r['ttft_p50_ms'], '.0f')} / "
                       f"{_f(r['ttft_p95_ms'], '.0f')} | {_f(r['stream_tok_s_p50'], '.1f')} | "
                       f"{_f(r['latency_p50_ms'], '.0f')} | {r['server_peak_mib']:.0f} + {r['engine_peak_mib']:.0f}"
                       f" = {r['total_peak_mib']:.0f} ({r['engine_processes']}) | {r['errors']} | "
                       f"{r['others_share']:.0%} |")
    if eng.get("server_log_problems"):
        out += ["", "Server log warnings/errors:", "", "```", *eng["server_log_problems"], "```"]
    return out + [""]


def plots(res: dict, out: Path, plt) -> list[str]:
    """sweep_throughput.png and sweep_ttft.png with every engine of the engines sweep."""
    eng = res["engines"]
    d, levels = eng["derived"], eng["levels"]
    title = f"{eng['model']['n_embd']} x {eng['model']['n_layer']} {eng['model']['ftype']}"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, lv in d.items():
        ks = [k for k in levels if str(k) in lv and lv[str(k)]["tok_s"] is not None]
        ax.plot(ks, [lv[str(k)]["tok_s"] for k in ks], marker="o", label=_label(eng, m))
    ax.set(xscale="log", xlabel="concurrent streaming clients", ylabel="aggregate tokens/s",
           title=f"Aggregate throughput vs clients ({title})", ylim=(0, None))
    ax.set_xticks(levels, [str(k) for k in levels])
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep_throughput.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (m, lv) in enumerate(d.items()):
        ks = [k for k in levels if lv.get(str(k), {}).get("ttft_p50_ms") is not None]
        color = f"C{i}"
        ax.plot(ks, [lv[str(k)]["ttft_p50_ms"] for k in ks], "-", marker="o", color=color,
                label=f"{_label(eng, m)}, p50")
        ax.plot(ks, [lv[str(k)]["ttft_p95_ms"] for k in ks], "--", marker=".", color=color,
                label=f"{_label(eng, m)}, p95")
    ax.set(xscale="log", yscale="log", xlabel="concurrent streaming clients", ylabel="TTFT, ms",
           title=f"Time to first token vs clients ({title})")
    ax.set_xticks(levels, [str(k) for k in levels])
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "sweep_ttft.png", dpi=110)
    plt.close(fig)
    return ["sweep_throughput.png", "sweep_ttft.png"]


def _label(eng: dict, m: str) -> str:
    e = eng["entries"][m]
    if e["engine"] == "ggml":
        return f"batched ggml, parallel {e['parallel']}"
    return f"ctransformers, {e['workers']} worker(s) x {e['threads']} thread(s)"
