"""Running the HTTP server: uvicorn configured for a hostile network, signals, startup checks.

Order at start: logging, the open-file limit, the listening socket (a busy port is reported before any
model loads), the app (registry, keys), then uvicorn with the edge protocol (server.http_protocol).

Exit codes: 0 after a stop by a first SIGTERM/SIGINT, at any stage (while the app is built, while models
load, while serving); 2 for a configuration error or a port that cannot be bound; 3 if the application
failed to start; 128+N (130 for Ctrl-C, 143 for SIGTERM) when a second signal forced the stop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import threading

import uvicorn

from server import logs
from server.http_protocol import EdgeLimits, protocol_class
from server.settings import Settings

log = logging.getLogger("gpt4all_j_server")

FD_RESERVE_BASE = 64  # descriptors kept free for the listening socket, logs, the event loop, files
FD_RESERVE_PER_WORKER = 8  # pipes and the process handle of each worker (and of its replacement)
MIN_CONNECTIONS = 16
DEFAULT_MAX_CONNECTIONS = 1024  # the cap when --max-connections is 0 (nginx's usual worker_connections)
SHUTDOWN_MARGIN = 5.0  # uvicorn cancels what still runs this long after the shutdown grace
FLUSH_AFTER_CUT = 2.0  # after the grace's cut: time for the final events to go out, then connections close
FORCED_EXIT_AFTER = 10.0  # after a second signal the process exits at the latest this long after
LOG_FORMAT_ENV = "GPT4ALL_J_LOG_FORMAT"


def run(settings: Settings) -> int:
    """Serve until stopped; the process exit code."""
    from backends.registry import RegistryError
    from server.security import ConfigError

    try:
        logs.configure(settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ[LOG_FORMAT_ENV] = settings.log_format  # worker processes log in the same format
    quiet_exit = QuietExit()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before and after serving: exit quietly
        signal.signal(sig, quiet_exit)
    soft, _ = raise_open_file_limit()
    try:
        sockets = bind(settings.host, settings.port)
    except OSError as exc:
        print(f"error: {bind_error(settings.host, settings.port, exc)}", file=sys.stderr)
        return 2
    try:
        app = _create_app(settings)
    except (RegistryError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        _close(sockets)
        return 2
    server = EdgeServer(_config(app, settings, soft), app, settings)
    try:
        server.run(sockets=sockets)
    except SystemExit as exc:  # uvicorn exits this way when the application failed to start
        code = exc.code if isinstance(exc.code, int) else 1
        return server.exit_code if server.signals else code
    finally:
        quiet_exit.seen = max(quiet_exit.seen, server.signals)  # a signal after serving is not a first
        _close(sockets)
    return server.exit_code


def _create_app(settings: Settings):
    from server.app import create_app

    return create_app(settings)


def _config(app, settings: Settings, open_files: int) -> uvicorn.Config:
    """uvicorn's configuration: our protocol class and logging, the keep-alive and shutdown timeouts."""
    workers = _worker_count(app, settings)
    fits = connection_cap(open_files, workers)
    cap = settings.max_connections or min(fits, DEFAULT_MAX_CONNECTIONS)
    if settings.max_connections:
        how = "--max-connections"
    else:
        how = (f"--max-connections 0: the lower of {DEFAULT_MAX_CONNECTIONS} and the open-file limit {open_files} "
               f"less {open_files - fits} for {workers} worker(s) and the server's files")
    if cap > fits:
        log.warning("--max-connections %d may exceed the open-file limit (%d) next to %d worker(s): new "
                    "connections can fail before the cap is reached", cap, open_files, workers)
    metrics = getattr(app.state, "metrics", None)

    def on_reject(code: str) -> None:
        if metrics is not None:
            metrics.rejected.labels(reason=code).inc()

    limits = EdgeLimits.from_settings(settings, cap, on_reject)
    log.info("connection limits: %d connections (%s), headers %d bytes / %d fields, timeouts: headers %gs, "
             "body %gs, keep-alive %gs, send %gs", cap, how, limits.max_header_bytes, limits.max_headers,
             limits.header_timeout, limits.body_timeout, settings.keep_alive_timeout, limits.send_timeout)
    return uvicorn.Config(
        app, http=protocol_class(limits), ws="none", lifespan="on", log_config=None,
        log_level=logs.level_number(settings.log_level),
        access_log=False,  # our own access log line carries the request id, model and tokens
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
        timeout_graceful_shutdown=settings.shutdown_grace + SHUTDOWN_MARGIN,  # type: ignore[arg-type]
    )


def _worker_count(app, settings: Settings) -> int:
    registry = getattr(app.state, "registry", None)
    served = getattr(registry, "served", None)
    if served is None:
        return settings.max_workers
    return sum(m.spec.workers for m in served)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the (soft, hard) limits now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


def connection_cap(open_files: int, workers: int) -> int:
    """Connections that fit in the open-file limit next to the workers' pipes and the server's own files."""
    reserve = FD_RESERVE_BASE + FD_RESERVE_PER_WORKER * workers
    cap = open_files - reserve
    if cap < MIN_CONNECTIONS:
        cap = max(MIN_CONNECTIONS // 2, open_files // 4)
        log.warning("the open-file limit (%d) leaves little room for connections next to %d worker(s): "
                    "allowing %d; raise it with `ulimit -n`", open_files, workers, cap)
    return cap


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets (not yet listening) for every address of host; OSError if one cannot be bound."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen, sockets = set(), []
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            if port == 0:  # every address on the same port
                port = sock.getsockname()[1]
    except OSError:
        _close(sockets)
        raise
    return sockets


def bind_error(host: str, port: int, exc: OSError) -> str:
    """One line saying why host:port cannot be served and what to do."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot listen on {where}: the port is already in use (is another server running?); "
                f"choose another port with --port or GPT4ALL_J_PORT")
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges); use --port"
    if isinstance(exc, socket.gaierror):
        return f"cannot listen on {where}: unknown host {host!r}; check --host or GPT4ALL_J_HOST"
    return f"cannot listen on {where}: {exc.strerror or exc}; check --host/--port (GPT4ALL_J_HOST/GPT4ALL_J_PORT)"


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


class QuietExit:
    """The handler for signals outside uvicorn's watch (while the app is built, or after serving): exit
    without a traceback, 0 for a first stop signal (as while serving), 128+N for a later one."""

    def __init__(self) -> None:
        self.seen = 0  # stop signals received so far (uvicorn's count is added after serving)

    def __call__(self, sig: int, frame) -> None:
        self.seen += 1
        raise SystemExit(0 if self.seen == 1 else 128 + sig)


class EdgeServer(uvicorn.Server):
    """uvicorn's server with our signal policy: first signal drains, second forces, third exits at once."""

    def __init__(self, config: uvicorn.Config, app, settings: Settings) -> None:
        super().__init__(config)
        self.app = app
        self.settings = settings
        self.signals = 0
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def connections(self):
        """The edge protocol's connection registry."""
        return self.config.http_protocol_class.edge_connections

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and sockets and not self.should_exit:
            for sock in sockets:
                host, port = sock.getsockname()[:2]
                where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                log.info("listening on http://%s (press Ctrl-C to stop)", where)

    def handle_exit(self, sig: int, frame) -> None:
        """Runs in the signal handler: hand the work to the event loop (never re-raise the signal later)."""
        self.signals += 1
        name = signal.Signals(sig).name
        if self.signals == 1:
            self.should_exit = True
            self._soon(self._stop, name)
        elif self.signals == 2:
            self.exit_code = 128 + sig
            self._soon(self._force, name)
            timer = threading.Timer(FORCED_EXIT_AFTER, os._exit, args=(self.exit_code,))
            timer.daemon = True
            timer.start()
        else:
            os._exit(128 + sig)

    def _soon(self, callback, *args) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)

    def _lifecycle(self):
        return getattr(self.app.state, "lifecycle", None)

    def _stop(self, name: str) -> None:
        log.info("%s: stopping (a second Ctrl-C or SIGTERM stops at once)", name)
        lifecycle = self._lifecycle()
        if lifecycle is not None:
            lifecycle.request_stop()
        task = asyncio.get_running_loop().create_task(self._close_after_grace())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_after_grace(self) -> None:
        """After the grace (and the cut it brings), give final events a moment, then close what is left."""
        lifecycle = self._lifecycle()
        try:
            if lifecycle is not None:
                await asyncio.wait_for(lifecycle.cut.wait(), self.settings.shutdown_grace + 0.5)
            else:
                await asyncio.sleep(self.settings.shutdown_grace)
        except asyncio.TimeoutError:
            pass
        await asyncio.sleep(FLUSH_AFTER_CUT)
        left = self.connections.abort_all()
        if left:
            log.warning("stopping: closed %d connection(s) still open after the shutdown grace", left)

    def _force(self, name: str) -> None:
        lifecycle = self._lifecycle()
        if lifecycle is not None:
            lifecycle.force()  # logs what it ends
        else:
            log.warning("%s again: stopping at once", name)
        asyncio.get_running_loop().call_later(0.5, self.connections.abort_all)
