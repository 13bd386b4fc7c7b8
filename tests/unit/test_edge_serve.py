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
