"""Raw-socket clients for the HTTP edge tests: misbehaving clients that no HTTP library can play."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path


def connect(port: int, rcvbuf: int | None = None, mss: int | None = None, timeout: float = 30.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:port; rcvbuf/mss make it look like a slow or distant client."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if mss is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 30.0) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or `timeout` passes (False)."""
    sock.settimeout(0.5)
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def read_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """One whole response with a Content-Length (the connection may stay open)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    length = int(parse_response(data + b"")[1].get("content-length", "0"))
    while len(data.partition(b"\r\n\r\n")[2]) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of the first response in raw bytes."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return status, headers, body


def error_code(raw: bytes) -> tuple[int, str]:
    """Status and the JSON error body's code of a response."""
    status, _, body = parse_response(raw)
    return status, json.loads(body)["error"]["code"]


def send_in_background(sock: socket.socket, chunks) -> threading.Thread:
    """Send an iterable of chunks from a thread, ignoring the server closing on us."""

    def run() -> None:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def rss_kib(pid: int) -> int:
    """Resident memory of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


EDGE_REGISTRY = """
models:
  - id: succ
    path: {succ}
    prompt_template: plain
    sampling: {{temperature: 0}}
    workers: 1
  - id: rand
    path: {rand}
    prompt_template: plain
    workers: 1
"""


def spawn(registry: Path, log: Path, env: dict[str, str] | None = None, port: int | None = None,
          args: tuple[str, ...] = (), preexec_fn=None):
    """Start `python -m server serve` without waiting; (process, base URL)."""
    import os
    import subprocess
    import sys

    from tests.e2e.conftest import ROOT, free_port

    port = port or free_port()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "GPT4ALL_J_DEFAULT_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--registry", str(registry), "--port",
                             str(port), "--host", "127.0.0.1", *args], cwd=ROOT, env=full_env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc, base: str, log: Path, timeout: float = 60.0) -> None:
    """Wait until /ready answers 200 (RuntimeError with the log if the server exits or is too slow)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server not ready in time:\n{log.read_text()}")


SLOW_ENTRY = """
  - id: slow
    path: {slow}
    prompt_template: plain
    workers: 1
"""


def edge_registry(model_files: dict[str, Path], directory: Path, slow: bool = False) -> Path:
    """A registry with one successor and one random model, one worker each (and the slow model if asked)."""
    path = directory / "registry.yaml"
    text = EDGE_REGISTRY + (SLOW_ENTRY if slow else "")
    path.write_text(text.format(**{k: str(v) for k, v in model_files.items()}))
    return path
