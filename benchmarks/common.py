"""Shared benchmark pieces: model files (cached), the server under test, a light HTTP client, stats."""

from __future__ import annotations

import http.client
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / ".cache"
RESULTS = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    """Progress line on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- models ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelDef:
    """A benchmark model: GPT-J hyperparameters and its vocabulary kind ("gpt2" or "default")."""

    name: str
    n_embd: int
    n_layer: int
    n_head: int
    n_rot: int
    n_ctx: int = 2048
    ftype: str = "q4_0"
    vocab: str = "default"
    n_vocab: int = 1024
    seed: int = 11

    def key(self) -> str:
        """Cache key: every field that changes the file."""
        return (f"gptj-e{self.n_embd}-l{self.n_layer}-h{self.n_head}-r{self.n_rot}-c{self.n_ctx}-"
                f"{self.ftype}-{self.vocab}{self.n_vocab}-s{self.seed}")


TINY = ModelDef("tiny", n_embd=256, n_layer=6, n_head=8, n_rot=16, vocab="default", n_vocab=1024)
REAL = ModelDef("real", n_embd=1024, n_layer=12, n_head=16, n_rot=32, vocab="gpt2", n_vocab=50400)
# issue 10's size (GPT-J 6B's cost per token / ~8): the step benchmark and the engines sweep share this file
BIG = ModelDef("batched", n_embd=2048, n_layer=16, n_head=16, n_rot=64, vocab="default", n_vocab=50400)


def ensure_model(mdef: ModelDef) -> tuple[Path, dict]:
    """Write the model file once (cached by config); returns its path and a description."""
    from backends.ggml.writer import GPTJConfig, default_vocab, write_model

    folder = CACHE / "models"
    path = folder / f"{mdef.key()}.bin"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        return path, json.loads(meta_path.read_text())
    if mdef.vocab == "gpt2":
        from benchmarks.vocab import load_vocab

        vocab, source = load_vocab(CACHE / "whisper")
    else:
        vocab, source = default_vocab(mdef.n_vocab), f"default_vocab({mdef.n_vocab})"
    config = GPTJConfig(n_vocab=len(vocab), n_ctx=mdef.n_ctx, n_embd=mdef.n_embd, n_head=mdef.n_head,
                        n_layer=mdef.n_layer, n_rot=mdef.n_rot, ftype=mdef.ftype)
    log(f"writing model {mdef.name} ({mdef.key()}) ...")
    t = time.monotonic()
    write_model(path, config, vocab=vocab, seed=mdef.seed, kind="random")
    meta = {**asdict(mdef), "n_vocab": len(vocab), "vocab_source": source, "file": path.name,
            "file_bytes": path.stat().st_size, "write_seconds": round(time.monotonic() - t, 1)}
    meta_path.write_text(json.dumps(meta, indent=1))
    return path, meta


def eos_id(path: Path) -> int:
    """Id of <|endoftext|> in a model file's vocabulary."""
    from backends.ggml.reader import read_vocab

    return read_vocab(path).index(b"<|endoftext|>")


# ---- prompts and requests ----------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BASE = ("The old harbour town was quiet in the early morning, and the fishermen walked down to the "
        "boats while the")
WORDS = ("the a of and to in is was for on with as by at from that this it be are were river city house "
         "garden road window market story music water light stone winter summer friend teacher doctor "
         "question answer morning evening history science bridge forest mountain village").split()
SYSTEM = ("You are a helpful assistant. Answer the questions of the user clearly, in a few sentences, and "
          "keep the conversation friendly and on topic.")


class Prompts:
    """Prompts whose first token differs from the previous ones' (no accidental prefix reuse)."""

    def __init__(self) -> None:
        self.k = 0

    def next(self) -> str:
        """The next prompt."""
        self.k += 1
        return f"{LETTERS[self.k % len(LETTERS)]} {BASE}"

    def many(self, n: int) -> list[str]:
        """n prompts."""
        return [self.next() for _ in range(n)]


def completion_body(model: str, prompt: str, n: int, eos: int) -> dict:
    """A greedy completion of exactly n tokens (EOS banned)."""
    return {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "seed": 0,
            "logit_bias": {str(eos): -100}}


# ---- the server under test -------------------------------------------------------------------------

def write_registry(path: Path, entries: list[dict]) -> Path:
    """A registry YAML with the given model entries (plain template, ctransformers unless set: the classic
    phases compare the server with the raw ctransformers engine)."""
    import yaml

    models = [{"prompt_template": "plain", "sampling": {"temperature": 0}, "engine": "ctransformers", **e}
              for e in entries]
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return path


def start(registry: Path, log_path: Path, env: dict[str, str] | None = None):
    """Start the real server (tests.e2e.conftest.start_server) with generous queue limits."""
    from tests.e2e.conftest import start_server

    base = {"GPT4ALL_J_QUEUE_TIMEOUT": "0", "GPT4ALL_J_DEFAULT_MAX_QUEUE": "256",
            "GPT4ALL_J_LOAD_TIMEOUT": "600"}
    return start_server(registry, log_path, extra_env=base | (env or {}))


def stop(server) -> None:
    """Stop the server."""
    from tests.e2e.conftest import stop_server

    stop_server(server)


def port_of(server) -> int:
    """The server's TCP port."""
    return int(server.base.rsplit(":", 1)[1])


def children(pid: int) -> list[int]:
    """Direct child pids of a process."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process (all its threads, live and ended), to the nanosecond."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)  # Linux's process CPU clock (CPUCLOCK_SCHED)
    except OSError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK


def descendants(pid: int) -> list[int]:
    """All descendant pids of a process."""
    out, todo = [], [pid]
    while todo:
        try:
            kids = children(todo.pop())
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants (those still alive)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            total += cpu_seconds(p)
        except OSError:
            pass
    return total


def _system_busy() -> float:
    """CPU seconds the whole machine has spent busy since boot (all CPUs)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / CLK_TCK


def busy_share(seconds: float = 2.0) -> float:
    """Share of all CPUs that were busy over the next `seconds` (whoever used them)."""
    t, busy = time.monotonic(), _system_busy()
    time.sleep(seconds)
    return (_system_busy() - busy) / ((time.monotonic() - t) * (os.cpu_count() or 1))


EXITED_CPU = [0.0]  # CPU seconds of our helper processes that have already exited (see RawProcs.close)


class Contention:
    """Measures how much CPU other processes used during a phase (the machine is shared)."""

    def __enter__(self) -> "Contention":
        self.t, self.busy = time.monotonic(), _system_busy()
        self.ours = tree_cpu(os.getpid()) + EXITED_CPU[0]
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self.t
        busy, ours = _system_busy() - self.busy, tree_cpu(os.getpid()) + EXITED_CPU[0] - self.ours
        foreign = max(0.0, busy - ours)
        self.result = {"seconds": round(wall, 1), "busy_cpu_s": round(busy, 2), "our_cpu_s": round(ours, 2),
                       "foreign_cpu_s": round(foreign, 2),
                       "foreign_share": round(foreign / (wall * (os.cpu_count() or 1)), 3)}


# ---- a light HTTP client (stdlib; its CPU cost competes with the engine on 2 cores) ------------------

def post_stream(port: int, path: str, body: dict, timeout: float = 600, collect: bool = False) -> dict:
    """POST a streaming request over a raw socket; times the first text and the end; returns usage.

    Until the first text arrives each event is parsed; after that the client only receives bytes
    (one recv per chunk), so its CPU cost, which competes with the engine on 2 cores, stays small.
    """
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    chat = "chat" in path
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    t0 = time.monotonic()
    sock.sendall(head + payload)
    parts: list[bytes] = []
    ttft = None
    scanned = b""
    while True:
        data = sock.recv(65536)
        if not data:
            break
        parts.append(data)
        if ttft is None:
            scanned += data
            lines = scanned.split(b"\n")
            scanned = lines.pop()
            if any(x.startswith(b"data: {") and has_text(x[6:], chat) for x in lines):
                ttft = time.monotonic() - t0
    total = time.monotonic() - t0
    sock.close()
    status, events = _sse_events(b"".join(parts))
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {events[:1]!r}")
    if not events or events[-1] != b"[DONE]":
        raise RuntimeError(f"stream did not end with [DONE]: {events[-2:]!r}")
    final = json.loads(events[-2])
    if "error" in final:
        raise RuntimeError(f"stream error: {final['error']}")
    text = "".join(_text(e, chat) for e in events[:-1]) if collect else ""
    return {"t0": t0, "ttft": ttft, "total": total, "chunks": len(events) - 1, "usage": final.get("usage"),
            "text": text}


def _sse_events(raw: bytes) -> tuple[int, list[bytes]]:
    """HTTP status and the SSE data payloads of a whole (chunked) response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        out, i = [], 0
        while True:
            j = body.index(b"\r\n", i)
            size = int(body[i:j].split(b";")[0], 16)
            if size == 0:
                break
            out.append(body[j + 2 : j + 2 + size])
            i = j + 2 + size + 2
        body = b"".join(out)
    if status != 200:
        return status, [body[:300]]
    return status, [x[6:].rstrip(b"\r") for x in body.split(b"\n") if x.startswith(b"data: ")]


def _text(data: bytes, chat: bool) -> str:
    """The text a chunk carries."""
    choices = json.loads(data).get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return ((c.get("delta") or {}).get("content") if chat else c.get("text")) or ""


def has_text(data: bytes, chat: bool) -> bool:
    """Whether a chunk carries non-empty text (parsed only until the first one)."""
    return bool(_text(data, chat))


def post_json(port: int, path: str, body: dict, timeout: float = 600) -> dict:
    """POST a non-streamed request; returns its total time and body."""
    return post(port, path, {**body, "stream": False}, timeout)


def post(port: int, path: str, body: dict, timeout: float = 600) -> dict:
    """POST a JSON body as given (no field added); the start time, total seconds and the parsed body."""
    payload = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.monotonic()
    conn.request("POST", path, payload, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read()
    total = time.monotonic() - t0
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status} from {path}: {raw[:300]!r}")
    return {"t0": t0, "total": total, "body": json.loads(raw)}


# ---- stats -----------------------------------------------------------------------------------------

def median(xs: list[float]) -> float | None:
    """Median (None for no data)."""
    return percentile(xs, 50)


def percentile(xs: list[float], q: float) -> float | None:
    """Percentile with linear interpolation (None for no data)."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def metadata() -> dict:
    """Date, machine and versions, for results.json."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("ctransformers", "fastapi", "uvicorn", "sse-starlette", "pydantic", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None

    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip()

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cpus": os.cpu_count(), "load_average_start": list(os.getloadavg()),
        "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
        "git_commit": git("rev-parse", "--short", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
    }
