"""The batched engine process (backends/batched/process.py) over the worker pipe protocol, in a real spawned process."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import time

import pytest

from tests.batched import require_ggml

require_ggml()

from backends.batched.process import batched_main
from backends.tokenizer import Tokenizer
from backends.types import (
    ErrorKind,
    Failed,
    Finished,
    FinishReason,
    GenerationJob,
    ModelLimits,
    SamplingParams,
    Started,
    Tokens,
)
from backends.worker import unpack_tokens
from tests.models import successor_vocab, write_successor

SPAWN = mp.get_context("spawn")
GREEDY = SamplingParams(temperature=0.0)
EOS_ID = 256
N_CTX = 96
TIMEOUT = 15.0


def chain(prompt_ids: list[int]) -> list[int]:
    """The successor model's greedy continuation of a prompt (up to EOS)."""
    _, succ = successor_vocab()
    out, t = [], succ[prompt_ids[-1]]
    while t != EOS_ID:
        out.append(t)
        t = succ[t]
    return out


class Proc:
    """A spawned batched engine process and its end of the pipe."""

    def __init__(self, path, slots=4, chunk=8) -> None:
        self.conn, child = SPAWN.Pipe()
        self.progress = SPAWN.RawValue("q", 0)
        self.proc = SPAWN.Process(target=batched_main, args=(child, str(path), slots, 1, chunk, self.progress),
                                  kwargs={"n_ctx": N_CTX}, daemon=True)
        self.proc.start()
        child.close()
        self.vocab = successor_vocab()[0]

    def recv(self, timeout=TIMEOUT):
        assert self.conn.poll(timeout), "no message from the engine process"
        data = self.conn.recv_bytes()
        tokens = unpack_tokens(data)
        if tokens is not None:
            job_id, ids = tokens
            return Tokens(job_id, ids, [self.vocab[t] for t in ids])
        return pickle.loads(data)

    def send(self, *msg) -> None:
        self.conn.send(msg)

    def collect(self, pending: set[int], on_event=None) -> dict[int, list]:
        """Events per job until every pending job has ended."""
        events: dict[int, list] = {j: [] for j in pending}
        deadline = time.monotonic() + TIMEOUT
        while pending:
            assert time.monotonic() < deadline, f"jobs {pending} did not end"
            ev = self.recv()
            events.setdefault(ev.job_id, []).append(ev)
            if on_event is not None:
                on_event(ev)
            if isinstance(ev, (Finished, Failed)):
                pending.discard(ev.job_id)
        return events

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_successor(tmp_path_factory.mktemp("proc") / "succ.bin", n_ctx=128)


@pytest.fixture
def proc(model):
    p = Proc(model)
    yield p
    p.stop()


def tokens_of(events: list) -> list[int]:
    return [t for ev in events if isinstance(ev, Tokens) for t in ev.ids]


def check_greedy(events: list, prompt_ids: list[int]) -> None:
    """Started, then Tokens, then Finished(STOP) with exactly the successor chain."""
    assert isinstance(events[0], Started) and events[0].prompt_tokens == len(prompt_ids), events
    assert all(isinstance(ev, Tokens) for ev in events[1:-1]), events
    want = chain(prompt_ids)
    assert tokens_of(events) == want
    assert events[-1] == Finished(events[0].job_id, FinishReason.STOP, len(want))


def test_jobs_cancel_and_exit(proc):
    kind, limits, report = proc.recv(60)
    assert kind == "ready" and limits == ModelLimits(N_CTX, len(proc.vocab), EOS_ID)
    assert f"KV cache 4 slots x {N_CTX} positions x f16 = " in report, report
    tok = Tokenizer(proc.vocab)
    prompts = {1: "a", 2: "Then 0", 3: "c", 4: "\n", 5: [ord("k")], 6: "x y f"}
    ids = {j: (tok.encode(p) if isinstance(p, str) else p) for j, p in prompts.items()}
    # job 7 never stops (EOS banned): cancelled after its first tokens
    long_job = GenerationJob(7, "a", None, SamplingParams(temperature=0.0, logit_bias={EOS_ID: -100.0}))
    proc.send("job", long_job)
    for j, p in prompts.items():  # 7 jobs, 4 slots
        proc.send("job", GenerationJob(j, p, None, GREEDY))

    cancelled = []

    def cancel_long(ev):
        if ev.job_id == 7 and isinstance(ev, Tokens) and not cancelled:
            cancelled.append(True)
            proc.send("cancel", 7)

    events = proc.collect(set(prompts) | {7}, cancel_long)
    for j in prompts:
        check_greedy(events[j], ids[j])
    long = events[7]
    assert isinstance(long[0], Started)
    got = tokens_of(long)
    assert long[-1] == Finished(7, FinishReason.CANCELLED, len(got))
    assert 0 < len(got) < N_CTX - 1  # it was still running
    assert got[:25] == chain([ord("a")])[:len(got)]  # greedy b..z before EOS would have come

    # later jobs still run: a reused prefix, a stray cancel, a prompt that cannot fit, an empty one
    proc.send("cancel", 7)
    proc.send("job", GenerationJob(8, "c", 3, GREEDY))
    proc.send("job", GenerationJob(9, "0" * (N_CTX + 5), None, GREEDY))
    proc.send("job", GenerationJob(10, "", None, GREEDY))
    events = proc.collect({8, 9, 10})
    assert isinstance(events[8][0], Started)
    assert tokens_of(events[8]) == chain([ord("c")])[:3]
    assert events[8][-1] == Finished(8, FinishReason.LENGTH, 3)
    assert events[9] == [events[9][0]] and events[9][0].kind is ErrorKind.CONTEXT_LENGTH
    assert events[10] == [events[10][0]] and events[10][0].kind is ErrorKind.INVALID_REQUEST
    assert proc.progress.value > 0

    proc.send("exit", None)
    proc.proc.join(10)
    assert proc.proc.exitcode == 0


def test_load_failed(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a model")
    p = Proc(bad)
    try:
        kind, reason = p.recv(60)
        assert kind == "load_failed" and reason
        p.proc.join(10)
        assert p.proc.exitcode == 0
    finally:
        p.stop()


class BrokenCore:
    """A core for serve() that yields successor logits for `good` steps, then raises."""

    n_slots, n_ctx, n_vocab, eos_token_id = 2, 32, 300, 256

    def __init__(self, good: int) -> None:
        self.good = good

    def reset(self, slot, keep) -> None:
        pass

    def step(self, decodes, chunk):
        import numpy as np

        if self.good <= 0:
            raise RuntimeError("ggml graph compute failed (status 1)")
        self.good -= 1
        rows = np.zeros((len(decodes), self.n_vocab), dtype=np.float32)
        for i, (_, t) in enumerate(decodes):
            rows[i, t + 1] = 1.0
        last = None
        if chunk is not None:
            last = np.zeros(self.n_vocab, dtype=np.float32)
            last[chunk[1][-1] + 1] = 1.0
        return rows, last


def test_core_failure_fails_every_job_and_exits_nonzero():
    import threading

    from backends.batched.process import CRASH_EXIT, serve

    vocab = successor_vocab()[0]
    ours, theirs = SPAWN.Pipe()
    result = []
    for j in (1, 2, 3):  # 3 jobs, 2 slots: one still waiting when the core breaks
        ours.send(("job", GenerationJob(j, [10 + j], 20, GREEDY)))
    t = threading.Thread(target=lambda: result.append(serve(theirs, BrokenCore(3), Tokenizer(vocab), vocab, 4)))
    t.start()
    t.join(TIMEOUT)
    assert result == [CRASH_EXIT]
    got = []
    while ours.poll(0):
        data = ours.recv_bytes()
        tokens = unpack_tokens(data)
        got.append(Tokens(tokens[0], tokens[1], []) if tokens else pickle.loads(data))
    ends = {ev.job_id: ev for ev in got if isinstance(ev, (Finished, Failed))}
    assert set(ends) == {1, 2, 3}
    assert all(isinstance(ev, Failed) and ev.kind is ErrorKind.INTERNAL and "status 1" in ev.message
               for ev in ends.values())
    assert any(isinstance(ev, Tokens) for ev in got)  # it ran before breaking
