"""End-to-end fixtures: the real server in a subprocess on a free loopback port, real generated models."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.models import write_random, write_successor

ROOT = Path(__file__).resolve().parents[2]

REGISTRY = """
templates:
  brackets: {{system: "<s>{{content}}</s>", user: "<u>{{content}}</u>", assistant: "<a>{{content}}</a>", generation: "\\n"}}
models:
  - id: succ
    aliases: [succ-alias]
    path: {succ}
    prompt_template: plain
    sampling: {{temperature: 0}}
    workers: 1
    max_queue: 8
  - id: succ-tmpl
    path: {succ}
    prompt_template: brackets
    system_prompt: "sys"
    sampling: {{temperature: 0}}
  - id: rand
    path: {rand}
    prompt_template: plain
    workers: 1
  - id: slow  # one generation at a time and a queue of 1: the queueing tests' model
    path: {slow}
    prompt_template: plain
    engine: ctransformers
    workers: 1
    max_queue: 1
  - id: absent
    path: {missing}
    url: http://127.0.0.1:9/absent.bin
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "succ": write_successor(d / "succ.bin"),
        "rand": write_random(d / "rand.bin"),
        "slow": write_random(d / "slow.bin", n_ctx=2048, n_embd=512, n_layer=8, seed=3),
        "missing": d / "missing.bin",
    }


class Server:
    """A running server subprocess."""

    def __init__(self, base: str, proc: subprocess.Popen, log: Path) -> None:
        self.base = base
        self.url = base + "/v1"
        self.proc = proc
        self.log = log

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(registry: Path, log: Path, extra_env: dict[str, str] | None = None,
                 port: int | None = None) -> Server:
    """Start `python -m server serve` and wait until /ready says ready."""
    port = port or free_port()
    # entries without `threads` get 1 engine thread: test servers share 2 cores with each other
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GPT4ALL_J_DEFAULT_THREADS": "1",
           # state (stored responses) next to the log, never in the user's data folder
           "GPT4ALL_J_DATA_DIR": str(log.parent / "data"), **(extra_env or {})}
    out = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--registry", str(registry), "--port", str(port),
         "--host", "127.0.0.1"],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                return Server(base, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server not ready in time:\n{log.read_text()}")


def serve_registry(text: str, folder: Path, extra_env: dict[str, str] | None = None):
    """Start a server on a registry written from `text` into `folder`; a generator for module fixtures
    (`yield from serve_registry(...)`): the server is stopped when the fixture ends."""
    registry = folder / "registry.yaml"
    registry.write_text(text)
    srv = start_server(registry, folder / "server.log", extra_env)
    try:
        yield srv
    finally:
        stop_server(srv)


def wait_for(predicate, timeout: float = 20.0) -> bool:
    """Poll a condition until it holds or the timeout passes; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def server(model_files, tmp_path_factory) -> Server:
    d = tmp_path_factory.mktemp("server")
    registry = d / "registry.yaml"
    registry.write_text(REGISTRY.format(**{k: str(v) for k, v in model_files.items()}))
    srv = start_server(registry, d / "server.log")
    yield srv
    stop_server(srv)


def with_engine(registry: str, engine: str) -> str:
    """The registry text with `engine` set on every entry that does not set one."""
    out = []
    for block in registry.split("\n  - id: "):
        if out and "engine:" not in block:
            first, _, rest = block.partition("\n")
            block = f"{first}\n    engine: {engine}\n{rest}"
        out.append(block)
    return "\n  - id: ".join(out)


@pytest.fixture(scope="session")
def ct_server(model_files, tmp_path_factory) -> Server:
    """The same models as `server`, through ctransformers (which stays selectable and tested)."""
    text = with_engine(REGISTRY, "ctransformers").format(**{k: str(v) for k, v in model_files.items()})
    yield from serve_registry(text, tmp_path_factory.mktemp("ct-server"))


@pytest.fixture(params=["ggml", "ctransformers"])
def engine_server(request) -> Server:
    """The session server of each engine (the default batched ggml engine, and ctransformers)."""
    return request.getfixturevalue("server" if request.param == "ggml" else "ct_server")


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
