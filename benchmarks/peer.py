"""Peer comparison: llama-cpp-python's OpenAI server against its own raw engine, on one LLaMA GGUF file.

    python -m benchmarks.peer [--quick]

The peer cannot load our GGML GPT-J files, so what is compared is each server's ratio to its own raw
engine (measured in the same run, alternating ABAB) and both servers' aggregate behaviour under the same
concurrency sweep. llama-cpp-python lives in its own virtual environment (built from source once, reused).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import httpx

PEER_SPEC = "llama-cpp-python[server]==0.3.36"
PEER_VENV = Path(__file__).parent / ".cache" / "peer-venv"
# CPU only, AVX2 level (what ctransformers' "avx2" library uses). Not -march=native: on these machines that
# compiles ggml's AMX kernels, which segfault in the first llama_decode. No GPU backends, BLAS, libcurl,
# multimodal library, tests, examples or tools.
CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
              "-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF "
              "-DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_HIP=OFF "
              "-DGGML_OPENCL=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF "
              "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF")


def _say(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


def _peer_ok(venv: Path) -> bool:
    py, stamp = venv / "bin" / "python", venv / "peer-build.txt"
    if not stamp.exists() or stamp.read_text() != f"{PEER_SPEC}\n{CMAKE_ARGS}\n":
        return False  # built with other settings (or not at all)
    return py.exists() and subprocess.run(
        [str(py), "-c", "import llama_cpp, llama_cpp.server.app"], capture_output=True).returncode == 0


def ensure_peer_venv(dir: Path = PEER_VENV, timeout: float = 2400.0) -> Path:
    """Create (or reuse) a separate venv with llama-cpp-python's server built for CPU; return its python."""
    dir, say = Path(dir), _say
    py = dir / "bin" / "python"
    if _peer_ok(dir):
        say(f"reusing {dir}")
        return py
    say(f"creating venv {dir}")
    dir.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["python3", "-m", "venv", "--clear", str(dir)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, FORCE_CMAKE="1",
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count()))
    say(f"building {PEER_SPEC} from source, ~5-25 min (CMAKE_ARGS={CMAKE_ARGS})")
    t0 = last = time.monotonic()
    log = dir / "build.log"
    with open(log, "w") as fh:
        # --no-cache-dir: a wheel cached from a build with other CMAKE_ARGS would be reused silently
        proc = subprocess.Popen([str(py), "-m", "pip", "install", "--no-cache-dir", "-v", PEER_SPEC],
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            time.sleep(5)
            now = time.monotonic()
            if now - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"peer build exceeded {timeout:.0f}s; see {log}")
            if now - last >= 60:
                last = now
                steps = re.findall(r"\[(\d+/\d+)\]", log.read_text(errors="replace"))
                say(f"building... {now - t0:.0f}s, compile step {steps[-1] if steps else '-'}")
    (dir / "peer-build.txt").write_text(f"{PEER_SPEC}\n{CMAKE_ARGS}\n")
    if proc.returncode != 0 or not _peer_ok(dir):
        raise RuntimeError(f"peer build failed (rc={proc.returncode}); see {log}")
    say(f"built in {time.monotonic() - t0:.0f}s")
    return py


# ---------------------------------------------------------------------------------------------- the run
# Per-token weights as the project's "real" GPT-J benchmark model (1024 x 12, q4_0, 50,400 vocab): LLaMA's
# three 1024 x 2816 MLP matrices hold about as many weights as GPT-J's two 1024 x 4096 ones.
MODEL = dict(n_vocab=50400, n_embd=1024, n_layer=12, n_head=16, n_ff=2816, ctx=2048, ftype="q4_0", seed=0)
N_CTX = 1024  # the context both the raw engine and the server allocate
_PROMPT = ("{i:05d}: once upon a time there was a small server that answered every request with a "
           "story about the world, and the model said hello to the worker and the engine")
_SEQ = iter(range(10**5))


def _prompt() -> str:
    """A fresh prompt of fixed token count that differs from all others right after <s> (no prefix reuse)."""
    return _PROMPT.format(i=next(_SEQ))


NOTES = [
    "llama-cpp-python's server holds one Llama behind a lock: requests run one at a time.",
    "With interrupt_requests=True (the default) a streaming response is ended early ('[DONE]' without a "
    "finish_reason, so it looks complete to a client) as soon as another request is waiting.",
    "OpenMP build: llama.cpp runs on whichever anyio worker thread the server picks, and each such thread "
    "brings its own OpenMP team. Once concurrency has made more teams, decoding stays slower for the rest of "
    "the process, as with OMP_WAIT_POLICY=PASSIVE (likely libgomp's throttled spin-wait with more threads "
    "than cores): compare single_stream with single_stream_after_sweep_* (worst for cheap tokens)."]

# Runs inside the peer venv: loads the model once, then serves timing jobs read as JSON lines on stdin.
RAW_WORKER = r"""
import json, sys, time, llama_cpp
path, threads, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                      verbose=False)
print(json.dumps({"ready": True, "version": llama_cpp.__version__,
                  "system_info": llama_cpp.llama_print_system_info().decode()}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    n, first, t0 = 0, None, time.perf_counter()
    if job["how"] == "generate":  # the engine's token loop: tokenize, eval, sample (greedy, in C)
        it = llm.generate(llm.tokenize(job["prompt"].encode(), add_bos=True), top_k=1, top_p=1.0,
                          min_p=0.0, temp=0.0, repeat_penalty=1.0)
    else:  # the library's OpenAI-shaped call in process, streaming: what the server wraps
        it = llm.create_completion(job["prompt"], max_tokens=job["tokens"], temperature=0.0, top_k=1,
                                   top_p=1.0, min_p=0.0, repeat_penalty=1.0, stream=True)
    for _ in it:
        n += 1
        first = first or time.perf_counter()
        if n >= job["tokens"] and job["how"] == "generate":
            break
    t1 = time.perf_counter()
    print(json.dumps({"ttft": first - t0, "total": t1 - t0, "n": job["tokens"], "chunks": n}), flush=True)
"""


def _pct(q: float, xs: list[float]) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def model_file(cfg: dict) -> Path:
    """Write (or reuse) the benchmark's LLaMA GGUF for a model config and return its path."""
    from benchmarks.gguf_llama import write_llama_gguf

    name = "peer-llama-{n_vocab}v-{n_embd}x{n_layer}-h{n_head}-ff{n_ff}-{ftype}-s{seed}".format(**cfg)
    path = PEER_VENV.parent / f"{name}-gguf{version('gguf')}.gguf"
    if not path.exists():
        _say(f"writing {path.name}")
        write_llama_gguf(path.with_suffix(".tmp"), **cfg).rename(path)
    return path


class RawEngine:
    """llama_cpp.Llama in a child process of the peer venv, driven by JSON lines."""

    def __init__(self, py: Path, model: Path, threads: int):
        self.proc = subprocess.Popen([str(py), "-c", RAW_WORKER, str(model), str(threads), str(N_CTX)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        try:
            self.info = self._read()
        except BaseException:
            _stop(self.proc)
            raise

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"raw engine exited (rc={self.proc.wait()})")
        return json.loads(line)

    def run(self, prompt: str, tokens: int, how: str = "generate") -> dict:
        """One timed generation: ttft and total seconds, tokens produced."""
        self.proc.stdin.write(json.dumps({"prompt": prompt, "tokens": tokens, "how": how}) + "\n")
        self.proc.stdin.flush()
        return self._read()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    for f in (proc.stdin, proc.stdout):
        if f:
            f.close()


class PeerServer:
    """`python -m llama_cpp.server` on a free loopback port."""

    def __init__(self, py: Path, model: Path, threads: int, interrupt_requests: bool, log: Path):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        args = ["-m", "llama_cpp.server", "--model", str(model), "--n_threads", str(threads),
                "--n_threads_batch", str(threads), "--n_ctx", str(N_CTX), "--host", "127.0.0.1",
                "--port", str(port), "--interrupt_requests", str(interrupt_requests), "--verbose", "False"]
        with open(log, "w") as fh:
            self.proc = subprocess.Popen([str(py), *args], stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"peer server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.base + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        _stop(self.proc)
        raise RuntimeError("peer server did not become ready in 180 s")


def _body(prompt: str, tokens: int, stream: bool) -> dict:
    return {"prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "top_k": 1, "top_p": 1.0,
            "min_p": 0.0, "repeat_penalty": 1.0, "stream": stream}


async def _stream(client, base: str, prompt: str, tokens: int) -> dict:
    """One streaming completion: ttft, total, chunks received and the finish reason."""
    t0 = time.perf_counter()
    first, chunks, finish = None, 0, None
    async with client.stream("POST", base + "/v1/completions", json=_body(prompt, tokens, True)) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:].strip()
            if data == "[DONE]":
                break
            if first is None:
                first = time.perf_counter()
            chunks += 1
            finish = json.loads(data)["choices"][0].get("finish_reason") or finish
    t1 = time.perf_counter()
    n = tokens if finish == "length" else chunks  # chunks ~ tokens (UTF-8 holdback may merge a few)
    return {"ttft": (first or t1) - t0, "total": t1 - t0, "n": n, "chunks": chunks, "finish": finish}


async def _complete(client, base: str, prompt: str, tokens: int) -> dict:
    t0 = time.perf_counter()
    r = await client.post(base + "/v1/completions", json=_body(prompt, tokens, False))
    t1 = time.perf_counter()
    r.raise_for_status()
    j, u = r.json(), r.json()["usage"]
    return {"total": t1 - t0, "n": u["completion_tokens"], "prompt_tokens": u["prompt_tokens"],
            "finish": j["choices"][0]["finish_reason"]}


def _summ(runs: list[dict]) -> dict:
    tps = [r["n"] / r["total"] for r in runs]
    out = {"tok_s": _pct(50, tps), "total_s": _pct(50, [r["total"] for r in runs]), "runs": len(runs),
           "n": sorted({r["n"] for r in runs})}
    if "ttft" in runs[0]:
        out["ttft_ms"] = 1e3 * _pct(50, [r["ttft"] for r in runs])
        decode = [(r["total"] - r["ttft"]) / max(1, r["n"] - 1) for r in runs]
        out["decode_us_per_token"] = 1e6 * _pct(50, decode)
    return out


def _vs(arm: dict, raw: dict, a: list[dict], b: list[dict], tokens: int) -> dict:
    paired = [(x["n"] / x["total"]) / (y["n"] / y["total"]) for x, y in zip(a, b)]
    out = {"tok_s_ratio": arm["tok_s"] / raw["tok_s"], "tok_s_ratio_paired_median": _pct(50, paired),
           "e2e_overhead_us_per_token": 1e6 * (arm["total_s"] - raw["total_s"]) / tokens}
    if "ttft_ms" in arm:
        out["per_token_overhead_us"] = arm["decode_us_per_token"] - raw["decode_us_per_token"]
        out["ttft_overhead_ms"] = arm["ttft_ms"] - raw["ttft_ms"]
    return out


async def _abab(raw: RawEngine, srv: PeerServer, tokens: int, reps: int) -> dict:
    """Raw engine, in-process library, server stream and non-stream, alternated; medians and ratios."""
    runs: dict[str, list[dict]] = {k: [] for k in ("raw", "library_stream", "server_stream",
                                                   "server_nonstream")}
    async with httpx.AsyncClient(timeout=600) as client:
        arms = {"raw": lambda p: raw.run(p, tokens, "generate"),
                "library_stream": lambda p: raw.run(p, tokens, "completion"),
                "server_stream": lambda p: _stream(client, srv.base, p, tokens),
                "server_nonstream": lambda p: _complete(client, srv.base, p, tokens)}
        for name, f in arms.items():  # warm-up: first evals allocate buffers
            r = f(_prompt())
            r = await r if hasattr(r, "__await__") else r
        prompt_tokens = r["prompt_tokens"]
        for rep in range(reps):
            order = list(arms) if rep % 2 == 0 else list(arms)[::-1]
            for name in order:
                r = arms[name](_prompt())
                runs[name].append(await r if hasattr(r, "__await__") else r)
    summ = {k: _summ(v) for k, v in runs.items()}
    vs = {k: _vs(summ[k], summ["raw"], runs[k], runs["raw"], tokens) for k in runs if k != "raw"}
    finishes = sorted({r["finish"] for k in ("server_stream", "server_nonstream") for r in runs[k]})
    return {"prompt_tokens": prompt_tokens, "arms": summ, "vs_raw": vs, "server_finish_reasons": finishes}


async def _sweep(raw: RawEngine, srv: PeerServer, levels, tokens: int, min_requests: int) -> list[dict]:
    """N concurrent streaming clients per level; aggregate tok/s and latency percentiles."""
    out = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        for n in levels:
            ref = [raw.run(_prompt(), tokens)]  # raw single stream, just before and after the level
            rounds = max(1, -(-min_requests // n))
            res, wall = [], 0.0
            for k in range(rounds):
                t0 = time.perf_counter()
                res += await asyncio.gather(*(_stream(client, srv.base, _prompt(), tokens) for _ in range(n)))
                wall += time.perf_counter() - t0
            ref.append(raw.run(_prompt(), tokens))
            agg = sum(r["n"] for r in res) / wall
            raw_tps = sum(r["n"] for r in ref) / sum(r["total"] for r in ref)
            out.append({"concurrency": n, "rounds": rounds, "requests": len(res),
                        "complete": sum(r["finish"] == "length" for r in res),
                        "tokens_delivered": sum(r["n"] for r in res), "tokens_asked": tokens * len(res),
                        "aggregate_tok_s": agg, "raw_single_stream_tok_s": raw_tps,
                        "raw_before_after_tok_s": [r["n"] / r["total"] for r in ref],
                        "aggregate_vs_raw": agg / raw_tps,
                        **{f"ttft_ms_p{q}": 1e3 * _pct(q, [r["ttft"] for r in res]) for q in (50, 95, 99)},
                        **{f"e2e_s_p{q}": _pct(q, [r["total"] for r in res]) for q in (50, 95, 99)}})
            _say(f"c={n}: {agg:.1f} tok/s aggregate ({agg / raw_tps:.2f}x raw), "
                 f"{out[-1]['complete']}/{len(res)} complete")
    return out


def run_peer(concurrency=(1, 2, 4, 8, 16), tokens: int = 128, threads: int = 2, quick: bool = False) -> dict:
    """Peer figures: llama-cpp-python server vs its raw engine (ABAB), and a concurrency sweep."""
    tokens = min(tokens, 32) if quick else tokens
    (reps, min_requests), cfg = (3, 1) if quick else (7, 16), MODEL  # min_requests: per level
    py = ensure_peer_venv()
    model = model_file(cfg)
    logdir = PEER_VENV.parent / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    result = {
        "what": ("llama-cpp-python's OpenAI server vs its own engine (llama_cpp.Llama in process, same "
                 "file, same threads, same n_ctx): greedy generation of exactly `tokens` tokens; ABAB "
                 "alternation, medians. Then N concurrent streaming /v1/completions clients per level, with "
                 "the server's default interrupt_requests=True and with it off."),
        "peer": {"package": PEER_SPEC, "cmake_args": CMAKE_ARGS},
        "model": {**cfg, "arch": "llama", "file_bytes": model.stat().st_size, "n_ctx": N_CTX,
                  "eos": "never chosen by construction (zero output rows for <unk>, <s>, </s>)"},
        "tokens": tokens, "threads": threads, "quick": quick, "reps": reps,
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_start": os.getloadavg()[0],
                    "python": platform.python_version(),
                    "gguf": version("gguf"), "httpx": version("httpx")},
        "notes": NOTES,
    }
    raw = RawEngine(py, model, threads)
    try:
        result["peer"].update(llama_cpp_version=raw.info["version"], system_info=raw.info["system_info"])
        for interrupt in (True, False):
            srv = PeerServer(py, model, threads, interrupt, logdir / f"server-interrupt-{interrupt}.log")
            time.sleep(2)  # let the start-up settle
            tag = "interrupt_requests_" + ("on_default" if interrupt else "off")
            try:
                if interrupt:
                    _say("ABAB: raw engine, library, server (fresh server)")
                    result["single_stream"] = asyncio.run(_abab(raw, srv, tokens, reps))
                _say(f"sweep, {tag}")
                result[f"sweep_{tag}"] = asyncio.run(_sweep(raw, srv, concurrency, tokens, min_requests))
                _say(f"ABAB again after the sweep, {tag}")
                after = asyncio.run(_abab(raw, srv, tokens, max(3, reps // 2)))
                result[f"single_stream_after_sweep_{tag}"] = after
            finally:
                _stop(srv.proc)
    finally:
        _stop(raw.proc)
    result["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
    return result


def main() -> None:
    """Run the peer benchmark standalone and print its figures as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer reps and requests, at most 32 tokens")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    a = ap.parse_args()
    res = run_peer(tuple(int(c) for c in a.concurrency.split(",")), a.tokens, a.threads, a.quick)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
