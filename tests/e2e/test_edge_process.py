"""The server process at its edges: busy port, bad settings, log formats, signals while loading and serving."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx

from tests.edge_sockets import edge_registry, spawn, wait_ready
from tests.models import NO_EOS

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")

SLOW_REGISTRY = """
models:
  - id: slow
    path: {slow}
    prompt_template: plain
    workers: 1
"""


def slow_registry(model_files, d: Path) -> Path:
    path = d / "registry.yaml"
    path.write_text(SLOW_REGISTRY.format(slow=model_files["slow"]))
    return path


def children(pid: int) -> list[int]:
    """Worker processes of the server (multiprocessing spawn children)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                out.append(int(child))
    return out


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except FileNotFoundError:
        return True


def test_a_busy_port_is_reported_before_any_model_loads(model_files, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, _ = spawn(edge_registry(model_files, tmp_path), tmp_path / "server.log", port=port)
        code = proc.wait(30)
    log = (tmp_path / "server.log").read_text()
    assert code == 2, log
    assert f"127.0.0.1:{port}" in log and "--port" in log and "GPT4ALL_J_PORT" in log
    assert "already in use" in log
    assert "Traceback" not in log and "serving" not in log and "startup" not in log


def test_bad_auth_settings_are_an_error_line_and_exit_2(model_files, tmp_path):
    proc, _ = spawn(edge_registry(model_files, tmp_path), tmp_path / "server.log",
                    env={"GPT4ALL_J_API_KEYS": " , "})
    code = proc.wait(30)
    log = (tmp_path / "server.log").read_text()
    assert code == 2 and "Traceback" not in log
    assert re.search(r"^error: .*api-keys", log, re.M | re.I), log


def test_json_logs_are_one_object_per_line_for_every_logger(model_files, tmp_path):
    log_path = tmp_path / "server.log"
    proc, base = spawn(edge_registry(model_files, tmp_path), log_path, args=("--log-format", "json"))
    wait_ready(proc, base, log_path)
    httpx.get(base + "/x%0Aforged%0D%1b[2J")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    loggers = {e["logger"] for e in entries}
    assert {"uvicorn.error", "gpt4all_j_server", "gpt4all_j_server.access"} <= loggers
    assert any('"GET /x%0Aforged%0D%1b%5B2J"' in e["message"] for e in entries)  # as sent: percent-encoded
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$", entries[0]["time"])


def test_a_second_signal_stops_at_once_quietly_and_non_zero(model_files, tmp_path):
    log_path = tmp_path / "server.log"
    proc, base = spawn(slow_registry(model_files, tmp_path), log_path, env={"GPT4ALL_J_SHUTDOWN_GRACE": "60"})
    wait_ready(proc, base, log_path)
    payloads = []
    with httpx.stream("POST", base + "/v1/completions", timeout=60, json={
            "model": "slow", "prompt": "Once", "max_tokens": 1500, "stream": True, **NO_EOS}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                payloads.append(line[6:])
                if len(payloads) == 2:
                    proc.send_signal(signal.SIGINT)
                    time.sleep(0.5)
                    proc.send_signal(signal.SIGINT)
                    stopped = time.monotonic()
    code = proc.wait(30)
    log = log_path.read_text()
    assert time.monotonic() - stopped < 20
    assert code == 128 + signal.SIGINT, log
    assert "Traceback" not in log, log
    assert payloads[-1] == "[DONE]"  # the stream was ended with a signal, not cut
    for line in log.splitlines():  # uvicorn's lines look like ours (timestamps), continuation lines aside
        assert TEXT_LINE.match(line) or line.startswith("  | "), line


def test_sigterm_while_a_model_loads_stops_at_once(model_files, tmp_path):
    log_path = tmp_path / "server.log"
    proc, _ = spawn(slow_registry(model_files, tmp_path), log_path)
    workers: list[int] = []
    deadline = time.monotonic() + 30
    while not workers and time.monotonic() < deadline:
        workers = children(proc.pid) if proc.poll() is None else []
        time.sleep(0.005)
    assert workers, log_path.read_text()
    for pid in workers:  # the load now never ends by itself (until --load-timeout, 300 s)
        os.kill(pid, signal.SIGSTOP)
    time.sleep(0.5)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    log = log_path.read_text()
    assert time.monotonic() - start < 15, log
    assert code == 0 and "Traceback" not in log, log
    assert "loading abandoned" in log and "listening on http" not in log
    deadline = time.monotonic() + 10
    while not all(gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(gone(pid) for pid in workers)
