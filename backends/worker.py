"""The worker process: loads one model once, then runs one generation at a time."""

from __future__ import annotations

import logging
import os
import select
import signal
import struct
import time
from array import array
from multiprocessing.connection import Connection

from backends.types import ErrorKind, Failed, GenerationJob, Tokens

# Plain generated tokens, without pickling: tag byte, job id, then one int32 per token id. Pickled
# messages start with 0x80, so the first byte tells the two apart.
TOKEN_TAG = ord("T")
TOKEN_HEADER = struct.Struct("<Bi")

log = logging.getLogger(__name__)

# Messages from the server to a worker: ("job", GenerationJob) | ("cancel", job_id) | ("exit", None)
# Messages from a worker to the server: ("ready", ModelLimits) | ("load_failed", str) | an Event


def pack_tokens(job_id: int, ids: list[int]) -> bytes:
    """The compact message for plain tokens of one job."""
    return TOKEN_HEADER.pack(TOKEN_TAG, job_id) + array("i", ids).tobytes()


def unpack_tokens(data: bytes) -> tuple[int, list[int]] | None:
    """(job id, token ids) of a compact token message, or None for a pickled message."""
    if data[0] != TOKEN_TAG or (len(data) - TOKEN_HEADER.size) % 4:
        return None
    ids = array("i")
    ids.frombytes(data[TOKEN_HEADER.size:])
    return TOKEN_HEADER.unpack_from(data)[1], ids.tolist()


def worker_main(conn: Connection, path: str, threads: int, batch_size: int, flush_interval: float = 0.0,
                progress=None) -> None:
    """Entry point of a spawned worker process; `progress` is a shared counter the server watches."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server shuts us down via "exit"
    from server.logs import setup  # the server's line format, escaping and JSON option

    setup(os.environ.get("GPT4ALL_J_LOG_FORMAT", "text"), os.environ.get("GPT4ALL_J_WORKER_LOG", "warning"))
    try:
        from backends.engine import Engine

        engine = Engine(path, threads=threads, batch_size=batch_size, progress=progress)
    except Exception as exc:  # a bad file must not take anything else down
        conn.send(("load_failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", engine.limits))
    serve(conn, engine, flush_interval)


def serve(conn: Connection, engine, flush_interval: float = 0.0) -> None:
    """Receive jobs until told to exit or the server goes away."""
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "exit":
            return
        if kind == "job":
            engine.beat()  # the job has arrived: a worker that never gets here trips the watchdog
            if run_job(conn, engine, payload, flush_interval):
                return
        # a stray "cancel" for a job that already ended is ignored


class TokenBatcher:
    """Sends plain tokens at once, except those that follow the last send within the interval.

    A held token goes out with the next token or event, so it is late by at most one token's
    time, and only when tokens come faster than the interval; the server then wakes up once per
    batch instead of once per token.
    """

    def __init__(self, conn: Connection, job_id: int, interval: float) -> None:
        self.send_bytes, self.job_id, self.interval = conn.send_bytes, job_id, interval
        self.held: list[int] = []
        self.last = float("-inf")

    def add(self, token: int) -> None:
        """Queue one token; send the batch unless it came too soon after the last send."""
        self.held.append(token)
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self.flush()

    def flush(self) -> None:
        """Send whatever is held."""
        if self.held:
            self.send_bytes(pack_tokens(self.job_id, self.held))
            self.held = []


def run_job(conn: Connection, engine, job: GenerationJob, flush_interval: float = 0.0) -> bool:
    """Run one job, forwarding its events and honouring a cancel between tokens; True = exit."""
    cancelled = exiting = False
    poller = select.poll()  # one syscall per check; Connection.poll builds a selector every call
    poller.register(conn.fileno(), select.POLLIN)

    def should_stop() -> bool:
        nonlocal cancelled, exiting
        while not cancelled and poller.poll(0):
            kind, payload = conn.recv()
            if kind == "cancel" and payload == job.job_id:
                cancelled = True
            elif kind == "exit":
                cancelled = exiting = True
        return cancelled

    batch = TokenBatcher(conn, job.job_id, flush_interval)
    try:
        for event in engine.run(job, should_stop):
            if event.__class__ is Tokens and event.logprobs is None:
                for token in event.ids:  # the hot path: a few bytes, no pickling
                    batch.add(token)
            else:
                batch.flush()
                conn.send(event)
    except (BrokenPipeError, EOFError, OSError):
        raise SystemExit(0)  # the server is gone
    except Exception as exc:
        log.exception("generation failed")
        engine.context.clear()
        batch.flush()
        conn.send(Failed(job.job_id, ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}"))
    return exiting
