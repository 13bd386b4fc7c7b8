"""server/embeddings.py's pure logic: inputs to token ids with their 400s, and how a request's inputs are
queued (EmbeddingRun over a fake engine: at most the slots on the engine, one place in the queue)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from backends.engine_api import ModelStatus, ModelUnavailable, QueueFull
from backends.tokenizer import Tokenizer
from backends.types import Embedding, ErrorKind, Failed, Finished, FinishReason, Started
from server.embeddings import EmbeddingRun, EmbedPlan, check_model, input_tokens
from server.errors import APIError
from server.protocol.embeddings import EmbeddingRequest, embedding_list

VOCAB = [bytes([b]) for b in range(256)] + [b"hello", b" world"]


def model(engine: str = "ggml", n_ctx: int = 8) -> SimpleNamespace:
    return SimpleNamespace(spec=SimpleNamespace(id="m", engine=engine), context_length=n_ctx,
                           info=SimpleNamespace(n_vocab=len(VOCAB), n_embd=16), tokenizer=Tokenizer(VOCAB))


def err(fn, *args) -> APIError:
    with pytest.raises(APIError) as exc:
        fn(*args)
    return exc.value


def test_the_four_input_shapes():
    m = model()
    assert input_tokens("hello world", m, 10) == [[256, 257]]
    assert input_tokens(["hello", "ab"], m, 10) == [[256], [97, 98]]
    assert input_tokens([1, 2, 3], m, 10) == [[1, 2, 3]]
    assert input_tokens([[1], [2, 3]], m, 10) == [[1], [2, 3]]


@pytest.mark.parametrize("value,code,words", [
    ("", "invalid_value", "input: the text is empty"),
    ([], "invalid_value", "'input' is empty"),
    (["a", ""], "invalid_value", "input[1]"),
    ([[1], []], "invalid_value", "input[1]"),
    ([1, 258], "invalid_value", "token id 258"),
    ([[1], [-1]], "invalid_value", "input[1]"),
    (["a"] * 11, "too_many_inputs", "at most 10"),
    ("abcdefghi", "context_length_exceeded", "input has more than 8 tokens"),
    ([list(range(9))], "context_length_exceeded", "input[0] has 9 tokens"),
    (list(range(9)), "context_length_exceeded", "input has 9 tokens"),
])
def test_bad_inputs_are_400s_naming_input(value, code, words):
    e = err(input_tokens, value, model(), 10)
    assert (e.status, e.param, e.code) == (400, "input", code)
    assert words in e.message, e.message


def test_an_input_of_exactly_the_context_fits():
    assert input_tokens("abcdefgh", model(), 10) == [list(range(97, 105))]


def test_the_engine_and_dimensions_are_checked():
    e = err(check_model, model("ctransformers"), EmbeddingRequest(model="m", input="x"))
    assert (e.param, e.code) == ("model", "unsupported_engine") and "engine: ggml" in e.message
    e = err(check_model, model(), EmbeddingRequest(model="m", input="x", dimensions=8))
    assert (e.param, e.code) == ("dimensions", "invalid_value")
    check_model(model(), EmbeddingRequest(model="m", input="x", dimensions=16))


def test_the_body_in_both_encodings():
    raw = [np.array([0.6, 0.8], "<f4").tobytes(), np.array([1.0, 0.0], "<f4").tobytes()]
    floats = embedding_list("m", raw, "float", 5)
    assert floats["data"][0] == {"object": "embedding", "embedding": [np.float32(0.6).item(), np.float32(0.8).item()],
                                 "index": 0}
    assert floats["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert embedding_list("m", raw, "base64", 5)["data"][1]["embedding"] == "AACAPwAAAAA="


class FakeEngine:
    """An engine with `slots` slots and a queue of `queue` places; jobs end when the test says so."""

    name, prefix_cache, limits, pieces = "m", False, None, ()

    def __init__(self, slots: int, queue: int) -> None:
        self.slots, self.capacity = slots, queue
        self.running: list = []
        self.pending: list = []
        self.ids = 0
        self.unavailable = False

    def new_job_id(self) -> int:
        self.ids += 1
        return self.ids

    def submit(self, job, sink, tag, group):
        if self.unavailable:
            raise ModelUnavailable("model m is unavailable", 3)
        if len(self.running) >= self.slots and len(self.pending) >= self.capacity:
            raise QueueFull("full")
        ticket = SimpleNamespace(tag=tag, done=False, job=job, sink=sink, queue_wait=0.0)
        ticket.cancel = lambda t=ticket: self.cancel(t)
        (self.running if len(self.running) < self.slots else self.pending).append(ticket)
        return ticket

    def finish(self, ticket, event=None) -> None:
        """The job ends (its vector, or `event`), and the head of the queue takes its slot."""
        job_id = ticket.job.job_id
        self.running.remove(ticket)
        ticket.done = True
        if event is None:
            ticket.sink.put_nowait((ticket.tag, Started(job_id, 1)))
            ticket.sink.put_nowait((ticket.tag, Embedding(job_id, b"\0\0\x80?")))
            event = Finished(job_id, FinishReason.STOP, 0)
        ticket.sink.put_nowait((ticket.tag, event))
        if self.pending:
            self.running.append(self.pending.pop(0))

    def cancel(self, ticket) -> None:
        if ticket.done:
            return
        (self.running if ticket in self.running else self.pending).remove(ticket)
        ticket.done = True
        ticket.sink.put_nowait((ticket.tag, Finished(ticket.job.job_id, FinishReason.CANCELLED, 0)))

    def status(self) -> ModelStatus:
        return ModelStatus("m", "ready", True, self.slots, len(self.running), len(self.pending), self.capacity,
                           1, 1, 0, None)


async def drain(run: EmbeddingRun, engine: FakeEngine) -> list:
    """Read the run's events while the engine ends its oldest running job every few milliseconds."""

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.002)
            if engine.running:
                engine.finish(engine.running[0])
            assert len(run.handles) - sum(t.done for t in run.handles) <= engine.slots

    ticker = asyncio.ensure_future(tick())
    try:
        return [item async for item in _within(run.events(), 5)]
    finally:
        ticker.cancel()


async def _within(events, seconds: float):
    while True:
        try:
            yield await asyncio.wait_for(events.__anext__(), seconds)
        except StopAsyncIteration:
            return


def run_of(engine: FakeEngine, n: int) -> EmbeddingRun:
    return EmbeddingRun(engine, EmbedPlan([[i + 1] for i in range(n)]), retry_after=1)


def test_a_request_takes_the_idle_slots_then_one_input_replaces_each_that_ends():
    async def main():
        engine = FakeEngine(slots=3, queue=4)
        run = run_of(engine, 10)
        run.submit()
        assert len(engine.running) == 3 and engine.pending == []
        seen = await drain(run, engine)
        vectors = {i for i, e in seen if isinstance(e, Embedding)}
        assert vectors == set(range(10))
        assert [j.job.embed for j in engine.running] == []
        assert all(t.job.embed and not t.job.reuse_prefix for t in run.handles)
    asyncio.run(main())


def test_a_request_waits_with_one_input_when_others_hold_the_slots():
    async def main():
        engine = FakeEngine(slots=2, queue=4)
        other = run_of(engine, 2)
        other.submit()  # holds both slots
        run = run_of(engine, 5)
        run.submit()
        assert len(engine.pending) == 1  # one place in the queue, not five
        assert len(run.handles) == 1
    asyncio.run(main())


def test_a_full_queue_refuses_the_request_with_503_and_queues_nothing():
    async def main():
        engine = FakeEngine(slots=1, queue=0)
        run_of(engine, 1).submit()
        run = run_of(engine, 3)
        e = err(run.submit)
        assert (e.status, e.code) == (503, "queue_full") and run.handles == []
    asyncio.run(main())


def test_a_full_queue_later_is_tried_again_until_it_fits():
    async def main():
        engine = FakeEngine(slots=1, queue=1)
        run = run_of(engine, 3)
        run.submit()
        first, second = run_of(engine, 1), run_of(engine, 1)
        first.submit()  # takes the one queue place
        engine.finish(engine.running[0])  # ours ends, the first runs...
        second.submit()  # ...and the second takes the queue place before ours is queued again
        seen = await drain(run, engine)
        assert run._timer is None
        assert {i for i, e in seen if isinstance(e, Embedding)} == {0, 1, 2}
    asyncio.run(main())


def test_cancel_ends_the_events_with_inputs_never_submitted():
    async def main():
        engine = FakeEngine(slots=2, queue=2)
        run = run_of(engine, 6)
        run.submit()
        run.cancel()
        seen = [event async for _, event in run.events()]
        assert sum(isinstance(e, Finished) and e.reason == FinishReason.CANCELLED for e in seen) == 2
        assert not engine.running and not engine.pending and len(run.handles) == 2
    asyncio.run(main())


def test_a_failure_is_the_requests_error_and_unavailable_stops_submitting():
    async def main():
        engine = FakeEngine(slots=1, queue=1)
        run = run_of(engine, 3)
        run.submit()
        engine.unavailable = True
        engine.finish(engine.running[0])
        seen = [e async for _, e in run.events()]
        failed = [e for e in seen if isinstance(e, Failed)]
        assert failed and failed[0].kind == ErrorKind.UNAVAILABLE
        e = run.fail(failed[0])
        assert (e.status, e.code) == (503, "model_unavailable") and e.headers["Retry-After"] == "3"
    asyncio.run(main())


def test_the_ctransformers_engine_refuses_an_embedding_job(tmp_path):
    """Its GPT-J gives no hidden states (LLM.embed returns an empty list): a job that reaches it fails cleanly."""
    pytest.importorskip("ctransformers")
    from backends.engine import Engine
    from backends.types import GenerationJob, SamplingParams
    from tests.models import write_random

    engine = Engine(str(write_random(tmp_path / "m.bin")), threads=1)
    events = list(engine.run(GenerationJob(1, [1, 2], 0, SamplingParams(), embed=True), lambda: False))
    assert len(events) == 1 and events[0].kind == ErrorKind.INVALID_REQUEST and "engine: ggml" in events[0].message
