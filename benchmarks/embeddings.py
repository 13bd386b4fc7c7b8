"""Embeddings on the batched engine and the Responses API's overhead (issue 12), through the real server.

    python -m benchmarks.embeddings [--reps 5] [--out benchmarks/results]

One server serves the 2048 x 16 q4_0 file with the batched engine (`engine: ggml`, its default slots,
2 threads). Three parts, each measurement with the CPU other processes used meanwhile:
1. embeddings throughput (input tokens/s) of K inputs of ~64 tokens (K = 8, 32; and 32 short inputs of ~8
   tokens) sent as one request, as K requests one after another, and as K requests at once; the forms' order
   rotates every rep; medians. One request / sequential is what sharing engine steps between inputs gives.
2. a streamed completion's decode rate alone vs while a 32-input embedding request is read (pairs, the
   order flipping): the flooded stream over the embedding request's window, the stream alone over the same
   stretch after its first text (as far as it ran).
3. /v1/responses vs /v1/chat/completions for the same short request (greedy, 16 tokens, the same prompt,
   so both reuse its cached prefix alike), non-streamed and streamed, store true and false: the median over
   alternating pairs of each pair's latency ratio.
Medians keep only quiet measurements (other processes at most 10% of the CPUs: the machine is shared).
Writes embeddings.json and embeddings.md; `--from-json FILE` derives them again from a saved run.
"""

from __future__ import annotations

import argparse
import base64
import json
import tempfile
import threading
import time
from pathlib import Path

from backends.registry import DEFAULT_PARALLEL
from benchmarks import common as c
from benchmarks import embeddings_report as rep
from benchmarks.common import post
from benchmarks.embeddings_http import final_usage, stream, text_times

MODEL_ID = "ggml"
THREADS = 2
CASES = ((8, 64), (32, 64), (32, 8))  # (inputs, tokens each): the two sizes, and short inputs
INPUT_TOKENS = 64  # part 2's inputs
FLOOD_INPUTS = 32
STREAM_TOKENS = 384  # long enough to outlast the embedding request it is measured against
FLOOD_DELAY = 0.5  # seconds after the stream's first text before the embedding request is sent
SHORT_TOKENS = 16  # the Responses API's smallest max_output_tokens
QUESTION = "Name three rivers of Europe."
PAIRS_PER_REP = 4  # part 3's pairs per variant and rep (each pair takes about a second)


def make_inputs(tokenizer, count: int, size: int, start: int = 0) -> list[str]:
    """`count` different texts of about `size` tokens each (words added until the tokenizer reaches size)."""
    out = []
    for k in range(start, start + count):
        words = [c.LETTERS[k % len(c.LETTERS)]]
        i = k
        while len(tokenizer.encode(" ".join(words), size + 8)) < size:
            words.append(c.WORDS[i % len(c.WORDS)])
            i += 7
        out.append(" ".join(words))
    return out


def embed(port: int, texts: list[str], n_embd: int) -> dict:
    """One /v1/embeddings request (base64, as OpenAI's SDK sends); checks the vectors' count and size."""
    r = post(port, "/v1/embeddings", {"model": MODEL_ID, "input": texts, "encoding_format": "base64"})
    data = r["body"]["data"]
    if len(data) != len(texts) or any(len(base64.b64decode(d["embedding"])) != 4 * n_embd for d in data):
        raise RuntimeError("embeddings: wrong number or size of vectors")
    return {"t0": r["t0"], "end": r["t0"] + r["total"], "tokens": r["body"]["usage"]["prompt_tokens"]}


def run_form(port: int, form: str, texts: list[str], n_embd: int) -> dict:
    """The texts as one request, as one request each in turn, or as one request each all at once."""
    if form == "one_request":
        parts = [embed(port, texts, n_embd)]
    elif form == "sequential":
        parts = [embed(port, [t], n_embd) for t in texts]
    else:
        parts = _concurrent(port, texts, n_embd)
    seconds = max(p["end"] for p in parts) - min(p["t0"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def _concurrent(port: int, texts: list[str], n_embd: int) -> list[dict]:
    """One request per text, all sent at once (a thread each, released together)."""
    out: list[dict | Exception] = [RuntimeError("not run")] * len(texts)
    barrier = threading.Barrier(len(texts))

    def one(i: int) -> None:
        barrier.wait()
        try:
            out[i] = embed(port, [texts[i]], n_embd)
        except Exception as exc:  # noqa: BLE001 - raised below, in the caller's thread
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in out:
        if isinstance(r, Exception):
            raise r
    return out  # type: ignore[return-value]


def throughput(port: int, inputs: dict[str, list[str]], n_embd: int, reps: int) -> dict:
    """Part 1: every form of every case, `reps` times (plus a warm-up round), the forms' order rotating."""
    runs: dict[str, dict[str, list[dict]]] = {k: {f: [] for f in rep.FORMS} for k in inputs}
    for r in range(reps + 1):
        for i, (k, texts) in enumerate(inputs.items()):
            for form in rep.form_order(r + i):
                with c.Contention() as busy:
                    m = run_form(port, form, texts, n_embd)
                if r:
                    runs[k][form].append(m | {"others_share": busy.result["foreign_share"]})
        if r:
            c.log(f"embeddings rep {r}: " + ", ".join(
                f"{k} {f} {runs[k][f][-1]['tok_s']:.0f}" for k in inputs for f in rep.FORMS))
    return {"runs": runs, "derived": rep.derive_throughput(runs)}


def flood_pair(port: int, eos: int, flood: list[str], n_embd: int, order: tuple[str, str],
               prompts: c.Prompts) -> dict:
    """Part 2, one pair: a stream alone and a stream with an embedding request sent during it."""
    out: dict = {}
    for kind in order:
        body = c.completion_body(MODEL_ID, prompts.next(), STREAM_TOKENS, eos) | {
            "stream": True, "stream_options": {"include_usage": True}}
        with c.Contention() as busy:
            out[kind] = _stream_with(port, body, flood if kind == "flood" else None, n_embd)
        out[kind]["others_share"] = busy.result["foreign_share"]
    return out


def _stream_with(port: int, body: dict, flood: list[str] | None, n_embd: int) -> dict:
    """A stream's text arrival times (from its first text) and, with `flood`, the embedding request's window."""
    first = threading.Event()
    box: dict = {}

    def reader() -> None:
        try:
            box["run"] = stream(port, "/v1/completions", body, first)
        except Exception as exc:  # noqa: BLE001 - raised below
            box["error"] = exc
            first.set()

    t = threading.Thread(target=reader)
    t.start()
    emb = None
    if flood is not None:
        first.wait(120)
        time.sleep(FLOOD_DELAY)
        emb = embed(port, flood, n_embd)
    t.join()
    if "error" in box:
        raise box["error"]
    run = box["run"]
    times = text_times(run)
    usage = final_usage(run) or {}
    out = {"times": [x - times[0] for x in times], "completion_tokens": usage.get("completion_tokens")}
    if emb is not None:
        out["window"] = [emb["t0"] - times[0], emb["end"] - times[0]]
        out["embedding_tokens"] = emb["tokens"]
    return out


def flood_effect(port: int, eos: int, flood: list[str], n_embd: int, reps: int, prompts: c.Prompts) -> dict:
    """Part 2: `reps` pairs (and a warm-up pair), alone and flooded, the order flipping every pair."""
    pairs = []
    for r in range(reps + 1):
        pair = flood_pair(port, eos, flood, n_embd, ("alone", "flood") if r % 2 else ("flood", "alone"), prompts)
        if r:
            pairs.append(pair)
            d = rep.pair_rates(pair)
            c.log(f"flood pair {r}: alone {d['alone_tok_s']:.1f} tok/s, during the embedding request "
                  f"{d['flood_tok_s']:.1f} tok/s, embedding {d['embedding_tok_s']:.0f} input tok/s")
    return {"pairs": pairs, "derived": rep.derive_flood(pairs)}


def chat_body(stream_it: bool) -> dict:
    """The short chat request (greedy, SHORT_TOKENS tokens at most)."""
    b = {"model": MODEL_ID, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": SHORT_TOKENS,
         "temperature": 0}
    return b | ({"stream": True, "stream_options": {"include_usage": True}} if stream_it else {})


def responses_body(stream_it: bool, store: bool) -> dict:
    """The same request to /v1/responses."""
    b = {"model": MODEL_ID, "input": QUESTION, "max_output_tokens": SHORT_TOKENS, "temperature": 0,
         "store": store}
    return b | ({"stream": True} if stream_it else {})


def timed(port: int, api: str, stream_it: bool, store: bool) -> dict:
    """One short request: total seconds, time to first text when streamed, and its generated tokens."""
    path, body = (("/v1/chat/completions", chat_body(stream_it)) if api == "chat"
                  else ("/v1/responses", responses_body(stream_it, store)))
    if not stream_it:
        r = post(port, path, body)
        usage = r["body"]["usage"]
        return {"total": r["total"], "ttft": None, "tokens": usage.get("completion_tokens", usage.get("output_tokens"))}
    r = stream(port, path, body)
    times = text_times(r)
    usage = final_usage(r) or {}
    return {"total": r["total"], "ttft": times[0] - r["t0"] if times else None,
            "tokens": usage.get("completion_tokens", usage.get("output_tokens"))}


def overhead(port: int, reps: int) -> dict:
    """Part 3: alternating pairs (chat, responses) per variant, PAIRS_PER_REP x reps each, after a warm-up round."""
    runs: dict[str, list[dict]] = {v: [] for v in rep.VARIANTS}
    rounds = PAIRS_PER_REP * reps
    for r in range(rounds + 1):
        for i, (name, (stream_it, store)) in enumerate(rep.VARIANTS.items()):
            order = ("chat", "responses") if (r + i) % 2 else ("responses", "chat")
            with c.Contention() as busy:
                pair = {api: timed(port, api, stream_it, store) for api in order}
            if r:
                runs[name].append(pair | {"others_share": busy.result["foreign_share"]})
    derived = rep.derive_overhead(runs)
    for name, d in derived.items():
        c.log(f"responses/chat {name}: {d['ratio']:.3f}x ({d['diff_ms']:+.1f} ms)")
    return {"runs": runs, "derived": derived, "question": QUESTION, "max_tokens": SHORT_TOKENS}


def main(argv: list[str] | None = None) -> dict:
    """Start the server, run the three parts, write embeddings.json and embeddings.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=c.RESULTS)
    ap.add_argument("--from-json", type=Path, help="derive the figures again from a saved embeddings.json; no run")
    args = ap.parse_args(argv)
    if args.from_json:
        return write(rep.rederive(json.loads(args.from_json.read_text())), args.out)
    from backends.ggml.reader import read_vocab
    from backends.tokenizer import Tokenizer

    path, meta = c.ensure_model(c.BIG)
    eos, tokenizer = c.eos_id(path), Tokenizer(read_vocab(path))
    inputs = {rep.case_key(k, n): make_inputs(tokenizer, k, n, start=100 * i) for i, (k, n) in enumerate(CASES)}
    flood = make_inputs(tokenizer, FLOOD_INPUTS, INPUT_TOKENS, start=1000)
    res: dict = {"meta": c.metadata(), "model": meta, "reps": args.reps, "input_tokens": INPUT_TOKENS,
                 "flood_inputs": FLOOD_INPUTS, "stream_tokens": STREAM_TOKENS}
    with tempfile.TemporaryDirectory(prefix="bench-embeddings-") as tmp:
        entry = {"id": MODEL_ID, "path": str(path), "engine": "ggml", "threads": THREADS}
        server = c.start(c.write_registry(Path(tmp) / "r.yaml", [entry]), Path(tmp) / "server.log")
        port = c.port_of(server)
        try:
            res["entry"] = entry | {"slots": DEFAULT_PARALLEL}  # no `parallel`: the default
            c.log("part 1: embeddings throughput")
            res["throughput"] = throughput(port, inputs, meta["n_embd"], args.reps)
            c.log("part 2: a stream during an embedding request")
            res["flood"] = flood_effect(port, eos, flood, meta["n_embd"], args.reps, c.Prompts())
            c.log("part 3: /v1/responses vs /v1/chat/completions")
            res["overhead"] = overhead(port, args.reps)
        finally:
            c.stop(server)
    return write(res, args.out)


def write(res: dict, out: Path) -> dict:
    """Write embeddings.json and embeddings.md into `out`; print the tables."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "embeddings.json").write_text(json.dumps(res, indent=1))
    (out / "embeddings.md").write_text(rep.markdown(res))
    print(rep.markdown(res))
    return res


if __name__ == "__main__":
    main()
