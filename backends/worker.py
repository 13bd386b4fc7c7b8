"""The worker process: loads one model once, then runs one generation at a time."""

from __future__ import annotations

import logging
import os
import signal
from multiprocessing.connection import Connection

import struct

from backends.types import ErrorKind, Failed, GenerationJob, Tokens

# One generated token, without pickling: tag byte, job id, token id. Pickled messages start with
# 0x80, so the first byte tells the two apart.
TOKEN_TAG = ord("T")
TOKEN_MESSAGE = struct.Struct("<Bii")

log = logging.getLogger(__name__)

# Messages from the server to a worker: ("job", GenerationJob) | ("cancel", job_id) | ("exit", None)
# Messages from a worker to the server: ("ready", ModelLimits) | ("load_failed", str) | an Event


def worker_main(conn: Connection, path: str, threads: int, batch_size: int) -> None:
    """Entry point of a spawned worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server shuts us down via "exit"
    logging.basicConfig(level=os.environ.get("GPT4ALL_J_WORKER_LOG", "WARNING"))
    try:
        from backends.engine import Engine

        engine = Engine(path, threads=threads, batch_size=batch_size)
    except Exception as exc:  # a bad file must not take anything else down
        conn.send(("load_failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", engine.limits))
    serve(conn, engine)


def serve(conn: Connection, engine) -> None:
    """Receive jobs until told to exit or the server goes away."""
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "exit":
            return
        if kind == "job" and run_job(conn, engine, payload):
            return
        # a stray "cancel" for a job that already ended is ignored


def run_job(conn: Connection, engine, job: GenerationJob) -> bool:
    """Run one job, forwarding its events and honouring a cancel between tokens; True = exit."""
    cancelled = exiting = False

    def should_stop() -> bool:
        nonlocal cancelled, exiting
        while not cancelled and conn.poll():
            kind, payload = conn.recv()
            if kind == "cancel" and payload == job.job_id:
                cancelled = True
            elif kind == "exit":
                cancelled = exiting = True
        return cancelled

    send, send_bytes, pack = conn.send, conn.send_bytes, TOKEN_MESSAGE.pack
    try:
        for event in engine.run(job, should_stop):
            if event.__class__ is Tokens and event.logprobs is None and len(event.ids) == 1:
                send_bytes(pack(TOKEN_TAG, event.job_id, event.ids[0]))  # the hot path: 9 bytes
            else:
                send(event)
    except (BrokenPipeError, EOFError, OSError):
        raise SystemExit(0)  # the server is gone
    except Exception as exc:
        log.exception("generation failed")
        engine.context.clear()
        conn.send(Failed(job.job_id, ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}"))
    return exiting

