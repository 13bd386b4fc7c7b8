"""Turn benchmark results into results.json, results.md, summary.md and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import report_engines


def _f(x, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def targets(res: dict) -> list[dict]:
    """The issue's targets, each with its measured value and pass/fail."""
    out = []

    def add(name: str, value, op: str, limit: float, unit: str, basis: str) -> None:
        ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
        out.append({"target": name, "value": value, "op": op, "limit": limit, "unit": unit,
                    "pass": ok, "basis": basis})

    if "single_real" in res:
        add("single stream tok/s vs raw (realistic model, streamed)", res["single_real"]["derived"]["stream_ratio"],
            ">=", 0.98, "x", "median of paired raw/server time ratios")
    if "single_tiny" in res:
        add("server overhead per token (tiny model, 1 worker x 1 thread, streamed)",
            res["single_tiny"]["derived"]["stream_overhead_us_per_token"], "<=", 50, "us",
            "median of paired (t_server - t_raw) / N")
        probe = res["single_tiny"]["ttft_probe"]
        add(f"TTFT overhead (tiny model, {probe.get('prompt_tokens')}-token prompt, streamed)",
            probe.get("overhead_ms"), "<=", 2, "ms",
            "median of paired server TTFT - raw time to first text, same prompt per pair")
    sw = res.get("sweep", {}).get("derived", {})
    if sw:
        best = sw["ceiling"]["best"]
        at = str(res["sweep"]["ceiling_at"])
        shape = max((s for s in sw if s != "ceiling"), key=lambda s: sw[s][at]["tok_s"])
        add(f"aggregate at {at} clients vs best raw configuration (pool {shape})",
            sw[shape][at]["tok_s"] / best, ">=", 0.95, "x", "median aggregate / median best raw aggregate")
    ch = res.get("chat", {}).get("derived", {})
    if ch:
        add(f"chat turn {len(ch['speedup'])} TTFT speedup with prefix reuse", ch["speedup"][-1], ">=", 3, "x",
            "median TTFT off / median TTFT on")
    return out


def _diag_line(res: dict, key: str) -> str | None:
    s = res.get(f"single_{key}")
    if not s:
        return None
    d = s["derived"]
    return (f"{_f(d['stream_ratio'], '.2f')}x tok/s streamed, {_f(d['stream_overhead_us_per_token'], '.0f')} us/token "
            f"streamed, {_f(d['json_ratio'], '.2f')}x not streamed, TTFT overhead "
            f"{_f(s['ttft_probe']['overhead_ms'], '.1f')} ms")


def _diagnostics(res: dict) -> list[str]:
    """Diagnostic rows (not targets): 2 engine threads, and token batching off."""
    rows = [("1 worker x 2 threads vs raw 2 threads", "tiny_2t"),
            ("1 x 1, token batching off (--token-batch-ms 0)", "tiny_nobatch"),
            ("1 x 2, token batching off", "tiny_2t_nobatch")]
    found = [(label, _diag_line(res, key)) for label, key in rows]
    found = [(label, line) for label, line in found if line]
    if not found:
        return []
    return ["", "Diagnostics (not targets), tiny model:", ""] + [f"- {label}: {line}" for label, line in found]


def summary(res: dict) -> str:
    """The short table for the README."""
    meta = res["meta"]
    lines = [f"Benchmark ({meta['mode']} run, {meta['date'][:10]}, {meta['cpu']}, {meta['cpus']} CPUs, "
             f"ctransformers {meta['versions'].get('ctransformers')}; `python -m benchmarks.run`):", ""]
    rows = targets(res)
    if rows:
        lines += ["| target | measured | goal | result |", "| --- | --- | --- | --- |"]
    for t in rows:
        verdict = "n/a" if t["pass"] is None else ("pass" if t["pass"] else "FAIL")
        fmt = {"x": ".3f", "us": ".0f", "ms": ".1f"}.get(t["unit"], ".2f")
        lines.append(f"| {t['target']} | {_f(t['value'], fmt)} {t['unit']} | {t['op']} {t['limit']:g} {t['unit']} "
                     f"| {verdict} |")
    lines += _diagnostics(res)
    engines = report_engines.targets_md(res)
    if engines:
        lines += ([""] if rows else []) + engines
    noisy = {k: v["foreign_share"] for k, v in res.get("contention", {}).items() if v["foreign_share"] > 0.05}
    if noisy:
        lines += ["", "WARNING: other processes used CPU during the run (share of all CPUs: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in noisy.items()) + "); figures are unreliable."]
    return "\n".join(lines) + "\n"


def _single_md(name: str, s: dict) -> list[str]:
    d = s["derived"]
    cpu = s["cpu_seconds"]
    n, reps, th = s["tokens"], s["reps"], s.get("threads", 2)
    per_tok = {m: {k: v / (n * reps) * 1e6 for k, v in cpu[m].items()} for m in cpu}
    return [
        f"### Single stream, {name} model ({n} tokens, {reps} reps, 1 worker x {th} thread{'s' * (th > 1)} vs raw "
        f"{th} thread{'s' * (th > 1)})", "",
        "| | raw engine | server, streamed | server, not streamed |", "| --- | --- | --- | --- |",
        f"| tokens/s (median) | {_f(d['raw_tok_s'], '.1f')} | {_f(d['stream_tok_s'], '.1f')} | "
        f"{_f(d['json_tok_s'], '.1f')} |",
        f"| ratio to raw (paired median) | 1 | {_f(d['stream_ratio'], '.3f')} | {_f(d['json_ratio'], '.3f')} |",
        f"| overhead per token, us | 0 | {_f(d['stream_overhead_us_per_token'], '.1f')} | "
        f"{_f(d['json_overhead_us_per_token'], '.1f')} |",
        f"| TTFT, {s.get('prompt_tokens')}-token prompt, ms (median) | {_f(d['raw_ttft_ms'])} | "
        f"{_f(d['stream_ttft_ms'])} | |",
        f"| TTFT overhead, ms (paired median) | | {_f(d['ttft_overhead_ms'])} | |",
        f"| TTFT, {s['ttft_probe']['prompt_tokens']}-token prompt, ms (median of {s['ttft_probe']['reps']}) | "
        f"{_f(s['ttft_probe']['raw_ms'])} | {_f(s['ttft_probe']['server_ms'])} | |",
        f"| TTFT overhead, short prompt, ms (paired median) | | {_f(s['ttft_probe']['overhead_ms'])} | |",
        f"| decode-only tok/s ratio (excl. TTFT) | 1 | {_f(d['stream_decode_ratio'], '.3f')} | |",
        f"| CPU us/token: this process (raw engine, or HTTP client) | {_f(per_tok['raw']['this_process'], '.0f')}"
        f" | {_f(per_tok['stream']['this_process'], '.0f')} | {_f(per_tok['json']['this_process'], '.0f')} |",
        f"| CPU us/token: server main process | {_f(per_tok['raw']['server_main'], '.0f')} | "
        f"{_f(per_tok['stream']['server_main'], '.0f')} | {_f(per_tok['json']['server_main'], '.0f')} |",
        f"| CPU us/token: worker processes | {_f(per_tok['raw']['workers'], '.0f')} | "
        f"{_f(per_tok['stream']['workers'], '.0f')} | {_f(per_tok['json']['workers'], '.0f')} |", "",
    ]


def _sweep_md(sw: dict) -> list[str]:
    d = sw["derived"]
    ceil = d["ceiling"]
    each = max(sw["per_client"], -(-sw.get("min_requests", 1) // sw["ceiling_at"]))
    out = [f"### Concurrency sweep (realistic model, {sw['tokens']} tokens per request, each client sends "
           f"max({sw['per_client']}, ceil({sw.get('min_requests', 1)} / clients)) requests, {sw['reps']} reps)", "",
           f"Raw ceiling ({sw['ceiling_at'] * each} requests): 1 process x 2 threads "
           f"{_f(ceil['raw_1x2'], '.1f')} tok/s, 2 processes x 1 thread {_f(ceil['raw_2x1'], '.1f')} tok/s.", "",
           "| pool | clients | aggregate tok/s | vs best raw | TTFT p50 / p95 / p99 ms | "
           "latency p50 / p95 / p99 ms | errors |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for shape in sw["shapes"]:
        for k in sw["levels"]:
            r = d[shape][str(k)]
            out.append(f"| {shape} | {k} | {_f(r['tok_s'], '.1f')} | {_f(r['tok_s'] / ceil['best'], '.3f')} | "
                       f"{_f(r['ttft_p50_ms'], '.0f')} / {_f(r['ttft_p95_ms'], '.0f')} / "
                       f"{_f(r['ttft_p99_ms'], '.0f')} | {_f(r['latency_p50_ms'], '.0f')} / "
                       f"{_f(r['latency_p95_ms'], '.0f')} / {_f(r['latency_p99_ms'], '.0f')} | {r['errors']} |")
    return out + [""]


def _chat_md(ch: dict) -> list[str]:
    d = ch["derived"]
    out = [f"### Multi-turn chat (realistic model, {ch['turns']} turns, {ch['user_words']}-word user messages, "
           f"{ch['answer_tokens']}-token answers, {ch['reps']} reps)", "",
           "| turn | prompt tokens | cached (on) | TTFT on, ms | TTFT off, ms | speedup |",
           "| --- | --- | --- | --- | --- | --- |"]
    for on, off, sp in zip(d["on"], d["off"], d["speedup"]):
        out.append(f"| {on['turn']} | {on['prompt_tokens']} | {on['cached_tokens']} | {_f(on['ttft_ms'], '.0f')} "
                   f"| {_f(off['ttft_ms'], '.0f')} | {_f(sp, '.2f')}x |")
    return out + [""]


def markdown(res: dict) -> str:
    """The full results as markdown tables."""
    meta = res["meta"]
    out = ["# Benchmark results", "",
           f"{meta['date']}, {meta['cpu']} ({meta['cpus']} CPUs), Python {meta['python']}, "
           + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
           + f"; git {meta['git_commit']}{' (dirty)' if meta['git_dirty'] else ''}; {meta['mode']} run in "
           f"{meta.get('seconds')} s; load average {meta['load_average_start'][0]:.2f} at start"
           + (f", CPUs {meta['cpu_busy_share_before']:.0%} busy just before"
              if "cpu_busy_share_before" in meta else "")
           + ".", "",
           "Every comparison is a ratio of two things measured in this run, alternating (ABAB), medians.", "",
           "## Models", "", "| model | n_embd x layers | ftype | vocab | file |", "| --- | --- | --- | --- | --- |"]
    for name, m in res["models"].items():
        out.append(f"| {name} | {m['n_embd']} x {m['n_layer']} | {m['ftype']} | {m['n_vocab']} "
                   f"({m['vocab_source']}) | {m['file_bytes'] / 1e6:.1f} MB |")
    out += ["", "## Targets", "", summary(res).split("\n", 2)[2], "## Other processes during each phase", "",
            "| phase | seconds | machine busy CPU s | ours | others | others' share of all CPUs |",
            "| --- | --- | --- | --- | --- | --- |"]
    for k, v in res.get("contention", {}).items():
        out.append(f"| {k} | {v['seconds']} | {v['busy_cpu_s']} | {v['our_cpu_s']} | {v['foreign_cpu_s']} | "
                   f"{v['foreign_share']:.1%} |")
    out += ["", "## Details", ""]
    for name, label in (("tiny", "tiny"), ("tiny_2t", "tiny (diagnostic: 2 threads)"),
                        ("tiny_nobatch", "tiny (diagnostic: token batching off)"),
                        ("tiny_2t_nobatch", "tiny (diagnostic: 2 threads, token batching off)"),
                        ("real", "realistic")):
        if f"single_{name}" in res:
            out += _single_md(label, res[f"single_{name}"])
    if "sweep" in res:
        out += _sweep_md(res["sweep"])
    if "chat" in res:
        out += _chat_md(res["chat"])
    out += report_engines.sweep_md(res)
    out += ["## Peer (llama-cpp-python)", ""]
    peer = res.get("peer", {})
    if peer.get("status") == "ok":
        out += ["```json", json.dumps(peer["result"], indent=1, default=str)[:20000], "```", ""]
    else:
        out += [f"Not run: {peer.get('status')}: {peer.get('error')}", ""]
    if "plots" in res:
        plots_ = res["plots"]
        out += [f"Plots: {', '.join(plots_) if isinstance(plots_, list) else plots_}.", ""]
    return "\n".join(out)


def plots(res: dict, out: Path) -> list[str]:
    """PNG plots of the sweep and the chat; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    prefix = ""
    if res.get("engines"):  # sweep_*.png show both engines; the issue 4 pool sweep moves to pool_sweep_*.png
        written += report_engines.plots(res, out, plt)
        prefix = "pool_"
    sw = res.get("sweep")
    if sw:
        d, levels = sw["derived"], sw["levels"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for shape in sw["shapes"]:
            ax.plot(levels, [d[shape][str(k)]["tok_s"] for k in levels], marker="o", label=f"server, pool {shape}")
        for name, style in (("raw_1x2", "--"), ("raw_2x1", ":")):
            ax.axhline(d["ceiling"][name], linestyle=style, color="gray",
                       label=f"raw {name[4:]} ({d['ceiling'][name]:.0f} tok/s)")
        ax.set(xscale="log", xlabel="concurrent streaming clients", ylabel="aggregate tokens/s",
               title="Aggregate throughput vs clients (realistic model)", ylim=(0, None))
        ax.set_xticks(levels, [str(k) for k in levels])
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{prefix}sweep_throughput.png", dpi=110)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for shape in sw["shapes"]:
            for q, style in (("50", "-"), ("95", "--")):
                ax.plot(levels, [d[shape][str(k)][f"ttft_p{q}_ms"] for k in levels], style, marker="o",
                        label=f"pool {shape}, p{q}")
        ax.set(xscale="log", yscale="log", xlabel="concurrent streaming clients", ylabel="TTFT, ms",
               title="Time to first token vs clients (realistic model)")
        ax.set_xticks(levels, [str(k) for k in levels])
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{prefix}sweep_ttft.png", dpi=110)
        plt.close(fig)
        written += [f"{prefix}sweep_throughput.png", f"{prefix}sweep_ttft.png"]
    ch = res.get("chat")
    if ch:
        d = ch["derived"]
        turns = [r["turn"] for r in d["on"]]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        w = 0.38
        ax.bar([t - w / 2 for t in turns], [r["ttft_ms"] for r in d["on"]], w, label="prefix reuse on")
        ax.bar([t + w / 2 for t in turns], [r["ttft_ms"] for r in d["off"]], w, label="prefix reuse off")
        ax.set(xlabel="turn", ylabel="TTFT, ms (median)", title="Multi-turn chat: TTFT per turn")
        ax.set_xticks(turns)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "chat_ttft.png", dpi=110)
        plt.close(fig)
        written.append("chat_ttft.png")
    return written


def write_all(res: dict, out: Path) -> str:
    """Write results.json, results.md, summary.md and the plots; return the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res["targets"] = targets(res)
    res["engine_targets"] = report_engines.engine_targets(res)
    try:
        res["plots"] = plots(res, out)
    except Exception as exc:  # a missing matplotlib must not lose the measurements
        res["plots"] = f"failed: {type(exc).__name__}: {exc}"
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "results.md").write_text(markdown(res))
    text = summary(res)
    (out / "summary.md").write_text(text)
    return text
