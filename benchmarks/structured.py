"""What constrained decoding costs (issue 11): decode tok/s with and without a JSON schema, and compile times.

    python -m benchmarks.structured [--reps 5] [--out benchmarks/results]

One server serves the 2048 x 16 q4_0 file through both engines (the batched engine and ctransformers, 2
threads each, one at a time). Each rep sends, alternating, an unconstrained chat request (EOS banned, N
tokens) and one constrained by a schema whose replies are long (an array of 16 short strings, 60-100 tokens); the figure
is the decode rate after the first token, so the prompt and the reply's length do not enter it. Compile
times are measured in this process with backends.grammar on the file's 50,400-token vocabulary.
Writes structured.json and structured.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks import common as c
from benchmarks.clients import stream_rate

SCHEMA = {"type": "object", "properties": {"words": {"type": "array", "minItems": 16, "maxItems": 16,
                                                     "items": {"type": "string", "minLength": 2, "maxLength": 4}}},
          "required": ["words"], "additionalProperties": False}
TYPICAL = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "email": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}}, "active": {"type": "boolean"},
    "role": {"enum": ["admin", "user", "guest"]},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}}},
    "required": ["name", "age"]}
ENTRIES = {"ggml": {"engine": "ggml", "parallel": 1}, "ctransformers": {"engine": "ctransformers"}}


def body(model_id: str, eos: int, n: int, constrained: bool) -> dict:
    """A chat request: constrained by SCHEMA, or free with EOS banned for n tokens."""
    b = {"model": model_id, "messages": [{"role": "user", "content": "List some words."}], "max_tokens": n,
         "temperature": 0, "seed": 0}
    if constrained:
        return b | {"max_tokens": 4 * n, "response_format": {"type": "json_schema",
                                                             "json_schema": {"name": "w", "schema": SCHEMA}}}
    return b | {"logit_bias": {str(eos): -100}}


def rates(port: int, model_id: str, eos: int, n: int, reps: int) -> dict:
    """Decode tok/s per request, free and constrained, alternating (ABAB)."""
    out: dict[str, list[float]] = {"free": [], "constrained": []}
    for i in range(reps + 1):
        for kind in (("free", "constrained") if i % 2 else ("constrained", "free")):
            r = c.post_stream(port, "/v1/chat/completions", body(model_id, eos, n, kind == "constrained"),
                              collect=kind == "constrained")
            if kind == "constrained":
                json.loads(r["text"])  # the guarantee, checked on every reply
            if i:  # the first round warms up
                out[kind].append(stream_rate(r))
    med = {k: c.median([x for x in v if x]) for k, v in out.items()}
    return {"runs": out, "median": med, "ratio": med["constrained"] / med["free"]}


def compile_times(path: Path) -> dict:
    """Milliseconds: the vocabulary trie (once per process), a typical schema's first compile and a cached one."""
    from backends.ggml.reader import read_vocab
    from backends.grammar import check, json_schema, vocab_for

    pieces = read_vocab(path)
    eos = c.eos_id(path)
    t = time.perf_counter()
    vocab_for(pieces, eos)
    trie = time.perf_counter() - t
    t = time.perf_counter()
    constraint = json_schema(TYPICAL)
    check(constraint, pieces, eos)
    first = time.perf_counter() - t
    t = time.perf_counter()
    check(json_schema(TYPICAL), pieces, eos)
    again = time.perf_counter() - t
    return {"vocab_ms": trie * 1e3, "typical_first_ms": first * 1e3, "typical_cached_ms": again * 1e3}


def main(argv: list[str] | None = None) -> dict:
    """Run both engines and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=c.RESULTS)
    args = ap.parse_args(argv)
    path, meta = c.ensure_model(c.BIG)
    eos = c.eos_id(path)
    res: dict = {"model": meta, "compile": compile_times(path), "engines": {}}
    with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
        entries = [{"id": k, "path": str(path), "threads": 2, **v} for k, v in ENTRIES.items()]
        server = c.start(c.write_registry(Path(tmp) / "r.yaml", entries), Path(tmp) / "server.log")
        try:
            for k in ENTRIES:
                c.log(f"structured: {k}")
                with c.Contention() as busy:  # while the server lives: its CPU counts as ours
                    res["engines"][k] = rates(c.port_of(server), k, eos, 96, args.reps)
                res["engines"][k]["others_share"] = busy.result["foreign_share"]
        finally:
            c.stop(server)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured.json").write_text(json.dumps(res, indent=1))
    (args.out / "structured.md").write_text(markdown(res))
    print(markdown(res))
    return res


def markdown(res: dict) -> str:
    """The results table."""
    cp = res["compile"]
    lines = ["| engine | free tok/s | constrained tok/s | ratio | other processes' CPU |",
             "| --- | --- | --- | --- | --- |"]
    for k, r in res["engines"].items():
        m = r["median"]
        lines.append(f"| {k} | {m['free']:.1f} | {m['constrained']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['others_share']:.0%} |")
    return "\n".join([
        f"Constrained decoding ({res['model']['n_embd']} x {res['model']['n_layer']} {res['model']['ftype']}, "
        f"decode tok/s after the first token, medians of alternating pairs):", "", *lines, "",
        f"Compile: vocabulary trie {cp['vocab_ms']:.0f} ms once per process; a typical 7-property schema "
        f"{cp['typical_first_ms']:.1f} ms the first time, {cp['typical_cached_ms']:.2f} ms cached.", ""])


if __name__ == "__main__":
    main()
