"""The embeddings benchmark's pure logic: run orders, the figures derived from its runs, and its report."""

from __future__ import annotations

from benchmarks import common as c

FORMS = ("one_request", "sequential", "concurrent")
QUIET = 0.10  # measurements while other processes used more of the CPUs than this are left out of the medians
VARIANTS = {"non-streamed, store": (False, True), "non-streamed, no store": (False, False),
            "streamed, store": (True, True), "streamed, no store": (True, False)}  # name: (stream, store)


def case_key(inputs: int, tokens: int) -> str:
    """Part 1's key of a case: inputs x tokens each."""
    return f"{inputs}x{tokens}"


def form_order(i: int) -> tuple[str, ...]:
    """Part 1's forms rotated by i (each form takes every place in turn)."""
    k = i % len(FORMS)
    return FORMS[k:] + FORMS[:k]


def quiet(ms: list[dict], share=lambda m: m["others_share"]) -> list[dict]:
    """The measurements during which other processes used at most QUIET of the CPUs."""
    return [m for m in ms if share(m) <= QUIET]


def derive_throughput(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """Per case: median input tok/s per form over its quiet measurements, the ratios to sequential, how many
    measurements were quiet and the worst other processes' share among them (and over all)."""
    out = {}
    for k, forms in runs.items():
        kept = {f: quiet(ms) for f, ms in forms.items()}
        med = {f: c.median([m["tok_s"] for m in ms]) for f, ms in kept.items()}
        seq = med["sequential"]
        used = [m for ms in kept.values() for m in ms]
        out[k] = {"tok_s": med, "tokens": {f: ms[0]["tokens"] for f, ms in forms.items() if ms},
                  "one_vs_sequential": _ratio(med["one_request"], seq),
                  "concurrent_vs_sequential": _ratio(med["concurrent"], seq),
                  "quiet": {f: len(ms) for f, ms in kept.items()}, "runs": {f: len(ms) for f, ms in forms.items()},
                  "all_tok_s": {f: c.median([m["tok_s"] for m in ms]) for f, ms in forms.items()},
                  "others_share": max((m["others_share"] for m in used), default=None),
                  "others_share_all": max((m["others_share"] for ms in forms.values() for m in ms), default=None)}
    return out


def window_rate(times: list[float], lo: float, hi: float) -> float | None:
    """Texts that arrived in (lo, hi] per second (None for an empty window)."""
    if hi <= lo:
        return None
    return sum(1 for t in times if lo < t <= hi) / (hi - lo)


def pair_rates(pair: dict) -> dict:
    """One part-2 pair: the flooded stream's rate over the embedding request's window (times from its first text;
    `covered` unless it ended first), the stream alone's over the same stretch as far as it ran, and the embedding
    request's input tok/s."""
    flood, alone = pair["flood"], pair["alone"]
    lo, hi = flood["window"]
    f_end, a_end = min(hi, flood["times"][-1]), min(hi, alone["times"][-1])
    a, f = window_rate(alone["times"], lo, a_end), window_rate(flood["times"], lo, f_end)
    return {"alone_tok_s": a, "flood_tok_s": f, "ratio": _ratio(f, a), "covered": f_end >= hi,
            "window_s": hi - lo, "alone_window_s": max(0.0, a_end - lo),
            "embedding_tok_s": flood["embedding_tokens"] / (hi - lo)}


def derive_flood(pairs: list[dict]) -> dict:
    """Part 2's medians over its quiet pairs."""
    n = len(pairs)
    pairs = quiet(pairs, lambda p: max(p["alone"]["others_share"], p["flood"]["others_share"]))
    rates = [pair_rates(p) for p in pairs]
    pick = lambda key: c.median([r[key] for r in rates if r[key] is not None])
    return {"pairs": rates, "alone_tok_s": pick("alone_tok_s"), "flood_tok_s": pick("flood_tok_s"),
            "ratio": pick("ratio"), "window_s": pick("window_s"), "alone_window_s": pick("alone_window_s"),
            "embedding_tok_s": pick("embedding_tok_s"),
            "all_covered": all(r["covered"] for r in rates), "quiet": len(pairs), "runs": n,
            "others_share": max((p[k]["others_share"] for p in pairs for k in ("alone", "flood")), default=None)}


def derive_overhead(runs: dict[str, list[dict]]) -> dict:
    """Per variant, over its quiet pairs: median latencies, the median of the pairs' ratios (responses / chat) and
    differences."""
    out = {}
    for name, every in runs.items():
        pairs = quiet(every)
        chat, resp = [p["chat"] for p in pairs], [p["responses"] for p in pairs]
        ttft = [_ratio(r["ttft"], h["ttft"]) for h, r in zip(chat, resp)]
        out[name] = {
            "chat_ms": _ms(c.median([h["total"] for h in chat])),
            "responses_ms": _ms(c.median([r["total"] for r in resp])),
            "ratio": c.median([r["total"] / h["total"] for h, r in zip(chat, resp)]),
            "diff_ms": _ms(c.median([r["total"] - h["total"] for h, r in zip(chat, resp)])),
            "ttft_ratio": c.median([x for x in ttft if x is not None]),
            "same_tokens": all(h["tokens"] == r["tokens"] for h, r in zip(chat, resp)),
            "tokens": chat[0]["tokens"] if chat else None, "pairs": len(pairs), "runs": len(every),
            "others_share": max((p["others_share"] for p in pairs), default=None)}
    return out


def markdown(res: dict) -> str:
    """The three tables and what they are."""
    m = res["model"]
    head = (f"{m['n_embd']} x {m['n_layer']} {m['ftype']}, batched engine ({res['entry']['slots']} slots, "
            f"{res['entry']['threads']} threads), {res['reps']} reps")
    return "\n".join([(f"Embeddings and the Responses API ({head}). Medians over the quiet measurements only: those "
                       f"during which other processes used at most {QUIET:.0%} of both CPUs (`quiet` = how many of "
                       "them; other processes' CPU = the worst share among those used, then over all):"), "",
                      *_throughput_table(res), "", *_flood_table(res), "", *_overhead_table(res), ""])


def rederive(res: dict) -> dict:
    """A results dict with its derived figures computed again from its runs."""
    res["throughput"]["derived"] = derive_throughput(res["throughput"]["runs"])
    res["flood"]["derived"] = derive_flood(res["flood"]["pairs"])
    res["overhead"]["derived"] = derive_overhead(res["overhead"]["runs"])
    return res


def _throughput_table(res: dict) -> list[str]:
    lines = ["Embeddings throughput, input tokens/s (K inputs of n tokens on average; medians):", "",
             ("| K x n | one request of K | K requests in turn | K requests at once | one / in turn | "
             "at once / in turn | quiet | other processes' CPU |"), "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k, d in res["throughput"]["derived"].items():
        t = d["tok_s"]
        lines.append(f"| {_case_label(k, d)} | {_f(t['one_request'])} | {_f(t['sequential'])} | {_f(t['concurrent'])} | "
                     f"{_x(d['one_vs_sequential'])} | {_x(d['concurrent_vs_sequential'])} | "
                     f"{_quiet(d['quiet'], d['runs'])} | {_pct(d['others_share'])}, {_pct(d['others_share_all'])} |")
    return lines


def _case_label(key: str, d: dict) -> str:
    """K x the inputs' mean tokens as the server counted them (the key's target when there is no count)."""
    k, n = key.split("x")
    total = (d.get("tokens") or {}).get("one_request")
    return f"{k} x {total / int(k):.0f}" if total else f"{k} x {n}"


def _quiet(kept: dict | int, runs: dict | int) -> str:
    """How many measurements were quiet, of how many (per form when they differ)."""
    if isinstance(kept, int):
        return f"{kept}/{runs}"
    return ", ".join(f"{kept[f]}/{runs[f]}" for f in kept) if len(set(kept.values())) > 1 else f"{min(kept.values())}/{max(runs.values())}"


def _flood_table(res: dict) -> list[str]:
    d = res["flood"]["derived"]
    key = case_key(res["flood_inputs"], res["input_tokens"])
    one = res["throughput"]["derived"].get(key, {}).get("tok_s", {}).get("one_request")
    cut = "" if d["all_covered"] else " (a flooded stream ended before its embedding request: window cut there)"
    return [(f"A streamed completion's decode rate while one request of {res['flood_inputs']} inputs of "
            f"~{res['input_tokens']} tokens is read (its {_f(d['window_s'], '.1f')} s; the stream alone over the same "
            f"stretch after its first text, {_f(d['alone_window_s'], '.1f')} s; medians of alternating pairs){cut}:"), "",
            ("| stream alone, tok/s | stream during the embedding request, tok/s | ratio | embedding input tok/s "
            f"during the stream (without: {key.replace('x', ' x ')} in one request) | quiet pairs | other processes' CPU |"),
            "| --- | --- | --- | --- | --- | --- |",
            (f"| {_f(d['alone_tok_s'])} | {_f(d['flood_tok_s'])} | {_x(d['ratio'])} | {_f(d['embedding_tok_s'], '.0f')}"
            f" ({_f(one, '.0f')}) | {d['quiet']}/{d['runs']} | {_pct(d['others_share'])} |")]


def _overhead_table(res: dict) -> list[str]:
    o = res["overhead"]
    lines = [(f"/v1/responses vs /v1/chat/completions, the same short request ({o['max_tokens']} tokens at most, "
             "greedy; latency to the last byte, median of the pairs' ratios):"), "",
             ("| form | chat ms | responses ms | responses / chat | difference ms | same tokens | quiet pairs | "
             "other processes' CPU |"), "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, d in o["derived"].items():
        lines.append(f"| {name} | {_f(d['chat_ms'], '.0f')} | {_f(d['responses_ms'], '.0f')} | {_x(d['ratio'], '.3f')}"
                     f" | {_f(d['diff_ms'], '+.1f')} | {'yes' if d['same_tokens'] else 'no'} ({d['tokens']}) | "
                     f"{d['pairs']}/{d['runs']} | {_pct(d['others_share'])} |")
    return lines


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _x(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt) + "x"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"
