"""Startup checks of server.serve: the listening socket, bind errors, the open-file limit and connection cap."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys

import pytest

from server import serve


def test_a_busy_port_is_found_by_bind_and_explained():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as info:
            serve.bind("127.0.0.1", port)
    assert info.value.errno == errno.EADDRINUSE
    message = serve.bind_error("127.0.0.1", port, info.value)
    assert f"127.0.0.1:{port}" in message and "already in use" in message
    assert "--port" in message and "GPT4ALL_J_PORT" in message


def test_bind_returns_unlistened_sockets_for_every_address():
    sockets = serve.bind("localhost", 0)
    try:
        assert sockets and len({s.getsockname()[1] for s in sockets}) == 1
        with socket.socket() as probe:  # bound, not yet listening: connections are refused
            assert probe.connect_ex(("127.0.0.1", sockets[0].getsockname()[1])) != 0
    finally:
        for sock in sockets:
            sock.close()


def test_other_bind_errors_name_the_address_and_the_settings():
    message = serve.bind_error("::1", 80, OSError(errno.EACCES, "Permission denied"))
    assert "[::1]:80" in message and "permission denied" in message
    message = serve.bind_error("nohost.invalid", 1, socket.gaierror(-2, "Name or service not known"))
    assert "nohost.invalid" in message and "--host" in message


def test_the_connection_cap_leaves_room_for_workers_and_files():
    assert serve.connection_cap(20000, 4) == 20000 - serve.FD_RESERVE_BASE - 4 * serve.FD_RESERVE_PER_WORKER
    assert serve.connection_cap(256, 2) == 256 - 64 - 16
    assert serve.connection_cap(64, 10) >= serve.MIN_CONNECTIONS // 2  # a tiny limit still serves someone


def test_the_soft_open_file_limit_is_raised_to_the_hard_one():
    code = ("import resource; soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
            "from server.serve import raise_open_file_limit; "
            "print(raise_open_file_limit() == (hard, hard) == resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr


def test_an_unset_connection_cap_is_at_most_1024_and_within_the_open_file_limit(caplog):
    from types import SimpleNamespace

    from server.settings import Settings

    app = SimpleNamespace(state=SimpleNamespace())  # no registry: the workers are --max-workers (64)
    reserve = serve.FD_RESERVE_BASE + 64 * serve.FD_RESERVE_PER_WORKER

    def cap(open_files: int, **settings) -> int:
        return serve._config(app, Settings(**settings), open_files).http.limits.max_connections

    with caplog.at_level("INFO", logger="gpt4all_j_server"):
        assert cap(1_048_576) == 1024  # was 1_048_000 (the hard open-file limit, less the reserve)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("connection limits"))
    assert "1024 connections" in line and "--max-connections" in line
    assert cap(1000) == 1000 - reserve  # the open-file limit is lower
    assert cap(1_048_576, max_connections=5000) == 5000  # set: taken as it is


def test_sigterm_while_the_app_is_built_exits_0_quietly(tmp_path):
    import signal
    import time

    code = ("import sys, time\n"
            "from server import serve\n"
            "from server.settings import Settings\n"
            "def build(settings):\n"
            "    print('building', flush=True)\n"
            "    time.sleep(60)\n"
            "serve._create_app = build\n"
            "sys.exit(serve.run(Settings(port=0)))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        for line in proc.stdout:  # logging is configured first
            if line.strip() == "building":
                break
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # was 143
        assert time.monotonic() - start < 20
        assert "Traceback" not in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()


def test_outside_uvicorn_a_first_stop_signal_exits_0_and_a_second_128_plus_n():
    import signal

    quiet = serve.QuietExit()
    with pytest.raises(SystemExit) as first:
        quiet(signal.SIGTERM, None)
    with pytest.raises(SystemExit) as second:
        quiet(signal.SIGINT, None)
    assert (first.value.code, second.value.code) == (0, 130)
