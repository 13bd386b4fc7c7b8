"""First run from any folder: no registry given, none in the current folder -> the per-user registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import free_port


def _wait_ready(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited early:\n{log.read_text()}"
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not ready in time:\n{log.read_text()}")


def test_serve_from_an_empty_folder_creates_and_uses_the_per_user_registry(tmp_path):
    dirs = {name: tmp_path / name for name in ("empty", "home", "config", "data")}
    for d in dirs.values():
        d.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("GPT4ALL_J_REGISTRY", "GPT4ALL_J_DATA_DIR")}
    env.update(HOME=str(dirs["home"]), XDG_CONFIG_HOME=str(dirs["config"]), XDG_DATA_HOME=str(dirs["data"]),
               PYTHONUNBUFFERED="1", GPT4ALL_J_DEFAULT_THREADS="1")
    registry = dirs["config"] / "gpt4all-j-server" / "model_registry.yaml"
    demo = dirs["data"] / "gpt4all-j-server" / "models" / "demo-gptj-q4_0.bin"
    port, log = free_port(), tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port)],
                                cwd=dirs["empty"], env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc, log)
        assert [m["id"] for m in httpx.get(base + "/v1/models", timeout=10).json()["data"]] == ["demo"]
        reply = httpx.post(base + "/v1/completions", json={"model": "demo", "prompt": "Hi", "max_tokens": 3},
                           timeout=30)
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"].startswith(" Hello!")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f"model registry: {registry} (created the per-user registry" in text, text
    assert registry.is_file() and demo.is_file()
    assert not list(dirs["empty"].iterdir())  # nothing was written where the command ran

    listed = subprocess.run([sys.executable, "-m", "server", "models", "list", "--json"], cwd=dirs["empty"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert f"registry: {registry} (the per-user registry" in listed.stderr
    rows = {row["id"]: row for row in json.loads(listed.stdout)}
    assert rows["demo"]["path"] == str(demo) and rows["demo"]["present"] is True
    assert rows["ggml-gpt4all-j-v1.3-groovy"]["path"].startswith(str(dirs["data"]))
