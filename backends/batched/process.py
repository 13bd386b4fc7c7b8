"""The batched engine's process loop: one BatchedEngine serving many jobs, over backends.worker's pipe protocol.

Messages in:  ("job", GenerationJob) | ("cancel", job_id) | ("exit", None)
Messages out: ("ready", ModelLimits, load report str) | ("load_failed", str) | events (plain Tokens as
backends.worker.pack_tokens bytes, everything else pickled), so the pool can drive either process.

Each turn drains every pending message without blocking, then runs one scheduler step (plan_step,
run_plan, apply) and bumps the shared progress counter; with nothing to run it blocks on the pipe.
A sampling error fails only its sequence (the scheduler isolates it); an error of the core fails
every live sequence with Failed(INTERNAL) and the process exits with code 1 (the pool replaces it).
"""

from __future__ import annotations

import logging
import os
import select
import signal
from multiprocessing.connection import Connection

from backends.types import ErrorKind, Failed, GenerationJob, ModelLimits, Tokens
from backends.worker import pack_tokens

log = logging.getLogger(__name__)

CRASH_EXIT = 1


class _PipeGone(BaseException):
    """The server closed its end: stop quietly (BaseException, so no handler of Exception swallows it)."""


def batched_main(conn: Connection, path: str, slots: int, threads: int, chunk: int, progress=None,
                 n_ctx: int | None = None) -> None:
    """Entry point of a spawned batched-engine process; `progress` is a shared counter the server watches."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server shuts us down via "exit"
    from server.logs import setup  # the server's line format, escaping and JSON option

    setup(os.environ.get("GPT4ALL_J_LOG_FORMAT", "text"), os.environ.get("GPT4ALL_J_WORKER_LOG", "warning"))
    try:
        from backends.batched import BatchedEngine, EngineConfig
        from backends.ggml.reader import read_vocab
        from backends.tokenizer import Tokenizer

        pieces = read_vocab(path)
        engine = BatchedEngine(path, EngineConfig(n_slots=slots, n_ctx=n_ctx, threads=threads))
    except Exception as exc:  # noqa: BLE001 - a bad file must not take anything else down
        conn.send(("load_failed", f"{type(exc).__name__}: {exc}"))
        return
    try:
        # the load report goes to the server, which logs it (this process logs only warnings by default)
        conn.send(("ready", ModelLimits(engine.n_ctx, engine.n_vocab, engine.eos_token_id), engine.report))
        code = serve(conn, engine, Tokenizer(pieces), pieces, chunk, progress)
    except (_PipeGone, BrokenPipeError, EOFError, OSError):
        code = 0
    if code:
        raise SystemExit(code)  # the core may be broken: do not touch it again
    engine.close()


def serve(conn: Connection, engine, tokenizer, pieces, chunk: int, progress=None) -> int:
    """Run jobs until "exit" or the server goes away (0), or until the core fails (CRASH_EXIT)."""
    from backends.batched.sampling import Row, sample_row
    from backends.batched.scheduler import Scheduler, run_plan

    send, send_bytes = conn.send, conn.send_bytes

    def emit(event) -> None:
        try:
            if event.__class__ is Tokens and event.logprobs is None:
                send_bytes(pack_tokens(event.job_id, event.ids))  # the hot path: no pickling
            else:
                send(event)
        except (BrokenPipeError, EOFError, OSError):
            raise _PipeGone from None

    def choose(logits, seq):
        job = seq.job
        allowed = None if seq.matcher is None else seq.matcher.allowed()
        got = sample_row(logits, Row(job.sampling, seq.tokens, seq.counts, len(seq.generated), job.logprobs,
                                     allowed), pieces)
        if got.error is not None:
            raise RuntimeError(got.error)  # the scheduler fails only this sequence
        return got.token, got.logprob

    vocab = None

    def matcher_for(job: GenerationJob):
        nonlocal vocab
        if job.sampling.constraint is None:
            return None
        from backends.grammar import Matcher, vocab_for

        vocab = vocab or vocab_for(pieces, engine.eos_token_id)  # built for the first grammar, then kept
        return Matcher(job.sampling.constraint, vocab)

    sched = Scheduler(engine.n_slots, engine.n_ctx, engine.eos_token_id, choose, emit, chunk=chunk,
                      pieces=pieces, n_vocab=engine.n_vocab, matcher_for=matcher_for)
    poller = select.poll()  # one syscall per check; Connection.poll builds a selector every call
    poller.register(conn.fileno(), select.POLLIN)

    def beat() -> None:
        if progress is not None:
            progress.value += 1

    def handle(message) -> bool:
        """Act on one message; True = exit."""
        kind, payload = message
        if kind == "exit":
            return True
        if kind == "job":
            beat()
            submit(payload)
        elif kind == "cancel":
            sched.cancel(payload)  # a stray cancel for a job that already ended is ignored
        return False

    def submit(job: GenerationJob) -> None:
        try:
            prompt = tokenizer.encode(job.prompt) if isinstance(job.prompt, str) else list(job.prompt)
            sched.submit(job, prompt)
        except Exception as exc:  # noqa: BLE001 - one bad job must not stop the others
            emit(Failed(job.job_id, ErrorKind.INVALID_REQUEST, f"{type(exc).__name__}: {exc}"))

    while True:
        try:
            while poller.poll(0):  # drain without blocking
                if handle(conn.recv()):
                    return 0
            plan = None if sched.idle else sched.plan_step()
            if plan is None:  # nothing to run: wait for the server
                if handle(conn.recv()):
                    return 0
                continue
        except (EOFError, OSError):
            return 0
        try:
            sched.apply(run_plan(engine, plan))
        except _PipeGone:
            raise
        except Exception as exc:  # the core (or its memory) is no longer trustworthy
            log.exception("batched step failed")
            sched.fail_all(ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}")
            return CRASH_EXIT
        beat()
