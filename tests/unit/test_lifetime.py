"""One owner for a generation request's lifetime: however a request ends, the engine saw a cancel for each job
still running, the accounting was closed once, the request left the shutdown lifecycle once and its outcome
is right. In-process, through the service, against a small fake engine (no real engine is involved)."""

from __future__ import annotations

import asyncio
import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest

from backends.engine_api import READY, JobGroup, ModelStatus
from backends.registry import ModelSpec, Registry, ServedModel
from backends.templates import BUILTIN_TEMPLATES
from backends.tokenizer import Tokenizer
from backends.types import ErrorKind, Failed, Finished, FinishReason, GenerationJob, Started, Tokens
from server.errors import APIError
from server.lifecycle import Lifecycle
from server.lifetime import Generation
from server.metrics import Metrics
from server.middleware import RequestRecord
from server.protocol import CompletionRequest
from server.service import InferenceService
from server.settings import Settings

PROMPT = [1, 2, 3]


class Ticket:
    """A submitted job; the test decides what it produces."""

    def __init__(self, engine: FakeEngine, job: GenerationJob, sink: asyncio.Queue, tag: int) -> None:
        self.engine, self.job, self.sink, self.tag = engine, job, sink, tag
        self.done = False  # the engine sent its last event (Finished or Failed)
        self.cancelled = False  # the engine was told to cancel it while it was running or queued
        self.queue_wait: float | None = None

    def cancel(self) -> None:
        self.engine.cancel(self)


class FakeEngine:
    """One model; jobs start at once (or never, with start=False) and produce what the test emits."""

    name, prefix_cache, pieces = "m", False, tuple(bytes([b]) for b in range(256))
    limits = None

    def __init__(self, start: bool = True) -> None:
        self.start = start
        self.tickets: list[Ticket] = []

    def new_job_id(self) -> int:
        return len(self.tickets) + 1

    def submit(self, job, sink=None, tag=0, group: JobGroup | None = None) -> Ticket:
        ticket = Ticket(self, job, sink, tag)
        self.tickets.append(ticket)
        if self.start:
            ticket.queue_wait = 0.0
            self.emit(ticket, Started(job.job_id, len(job.prompt)))
        return ticket

    def emit(self, ticket: Ticket, event: object) -> None:
        if ticket.done:
            return
        ticket.done = isinstance(event, (Finished, Failed))
        ticket.sink.put_nowait((ticket.tag, event))

    def tokens(self, ticket: Ticket, text: bytes) -> None:
        self.emit(ticket, Tokens(ticket.job.job_id, list(text), [bytes([b]) for b in text]))

    def finish(self, ticket: Ticket) -> None:
        self.emit(ticket, Finished(ticket.job.job_id, FinishReason.LENGTH, 0))

    def cancel(self, ticket: Ticket) -> None:
        if not ticket.done:
            ticket.cancelled = True
            self.emit(ticket, Finished(ticket.job.job_id, FinishReason.CANCELLED, 0))

    def status(self) -> ModelStatus:
        return ModelStatus(name="m", state=READY, available=True, slots=4, running=0, queued=0, queue_capacity=4,
                           processes=1, alive=1, restarts=0, problem=None)


class CountingLifecycle(Lifecycle):
    def __init__(self) -> None:
        super().__init__(grace=0)
        self.enters = self.leaves = 0

    def enter(self, token: object) -> None:
        self.enters += 1
        super().enter(token)

    def leave(self, token: object) -> None:
        self.leaves += 1
        super().leave(token)


class Harness:
    """A service over one fake engine, and one request's record, lifecycle and client."""

    def __init__(self, start: bool = True) -> None:
        spec = ModelSpec(id="m", path="/srv/m.bin")
        info = SimpleNamespace(n_vocab=256, n_ctx=64, eos_token_id=0)
        model = ServedModel(spec, Path(spec.path), info, BUILTIN_TEMPLATES["plain"],
                            Tokenizer([bytes([b]) for b in range(256)]))
        registry = Registry(Path("/srv/registry.yaml"), [spec], [model], skipped={}, unavailable={},
                            not_downloaded=frozenset())
        self.engine = FakeEngine(start)
        pool = SimpleNamespace(get={"m": self.engine}.get, status=lambda: {"m": self.engine.status()})
        self.metrics = Metrics()
        self.service = InferenceService(registry, pool, Settings(retry_after=2), self.metrics)
        self.record = RequestRecord("r")
        self.lifecycle = CountingLifecycle()
        self.gone = asyncio.Event()

    async def disconnected(self) -> None:
        await self.gone.wait()

    async def call(self, stream: bool, n: int = 1):
        req = CompletionRequest(model="m", prompt=PROMPT, max_tokens=8, n=n, stream=stream, seed=1)
        return await self.service.completions(req, self.disconnected, self.record, self.lifecycle)

    async def submitted(self, jobs: int = 1) -> None:
        for _ in range(1000):
            if len(self.engine.tickets) >= jobs:
                return
            await asyncio.sleep(0)
        raise AssertionError("the request never submitted its jobs")

    def counted(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(f"gpt4all_j_{name}_total", {"model": "m"})

    def check(self, outcome: str, finished_by_engine: int = 0, completion: int = 0) -> None:
        """Every job ended (a cancel for each the engine did not end), one close, one leave, this outcome."""
        tickets = self.engine.tickets
        assert tickets and all(t.done for t in tickets)
        assert sum(not t.cancelled for t in tickets) == finished_by_engine
        prompt = len(PROMPT)  # one prompt, whatever n is
        assert self.counted("prompt_tokens") == prompt and self.record.prompt_tokens == prompt
        assert self.counted("completion_tokens") == completion == self.record.completion_tokens
        assert (self.lifecycle.enters, self.lifecycle.leaves) == (1, 1) and not self.lifecycle.active
        assert self.record.outcome == outcome


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def scenario(fn):
    """Run an async test body to the end (bounded: nothing here may hang)."""
    return asyncio.run(asyncio.wait_for(fn(), 30))


# ---- the handler is cancelled ----

@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_handler_cancelled_while_waiting_for_the_first_event_ends_everything(stream):
    async def body():
        h = Harness(start=False)  # queued, never started
        task = asyncio.ensure_future(h.call(stream))
        await h.submitted()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        h.check("client_gone")

    scenario(body)


def test_a_handler_cancelled_mid_collection_ends_everything():
    async def body():
        h = Harness()
        task = asyncio.ensure_future(h.call(stream=False, n=2))
        await h.submitted(2)
        h.engine.tokens(h.engine.tickets[0], b"ab")
        h.engine.finish(h.engine.tickets[1])
        await _settle()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        h.check("client_gone", finished_by_engine=1, completion=2)

    scenario(body)


# ---- the stream body is closed early ----

def test_a_stream_closed_mid_stream_ends_everything_and_the_routes_close_is_idempotent():
    async def body():
        h = Harness()
        s = await h.call(stream=True)
        h.engine.tokens(h.engine.tickets[0], b"hi")
        events = s.events()
        assert json.loads(await events.__anext__())["choices"][0]["text"] == "hi"
        await events.aclose()
        s.close()  # what the route does after the response
        h.check("client_gone", completion=2)

    scenario(body)


def test_a_stream_never_iterated_is_ended_by_the_routes_close():
    async def body():
        h = Harness()
        s = await h.call(stream=True)
        assert h.lifecycle.active  # the stream owns the request until it is closed
        s.close()
        s.close()
        h.check("client_gone")

    scenario(body)


# ---- the engine fails ----

def test_an_engine_failure_mid_stream_cancels_the_other_jobs_and_ends_with_an_error_event():
    async def body():
        h = Harness()
        s = await h.call(stream=True, n=2)
        first = h.engine.tickets[0]
        h.engine.tokens(first, b"a")
        h.engine.emit(first, Failed(first.job.job_id, ErrorKind.INTERNAL, "boom"))
        out = [payload async for payload in s.events()]
        s.close()
        assert out[-1] == "[DONE]" and json.loads(out[-2])["error"]["code"] == "internal_error"
        h.check("error:internal_error", finished_by_engine=1, completion=1)

    scenario(body)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_an_engine_failure_before_the_first_token_is_an_http_error_that_ends_everything(stream):
    async def body():
        h = Harness(start=False)
        task = asyncio.ensure_future(h.call(stream, n=2))
        await h.submitted(2)
        first = h.engine.tickets[0]
        h.engine.emit(first, Failed(first.job.job_id, ErrorKind.QUEUE_TIMEOUT, "waited too long"))
        with pytest.raises(APIError) as err:
            await task
        assert err.value.code == "queue_timeout"
        h.check("error:queue_timeout", finished_by_engine=1)

    scenario(body)


# ---- the shutdown grace is over ----

@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_the_shutdown_cut_before_the_first_event_is_a_503_that_ends_everything(stream):
    async def body():
        h = Harness(start=False)
        task = asyncio.ensure_future(h.call(stream))
        await h.submitted()
        h.lifecycle.force()
        with pytest.raises(APIError) as err:
            await task
        assert err.value.code == "server_shutting_down"
        h.check("cut:shutdown")

    scenario(body)


def test_the_shutdown_cut_mid_stream_ends_it_with_an_error_event():
    async def body():
        h = Harness()
        s = await h.call(stream=True)
        h.engine.tokens(h.engine.tickets[0], b"a")
        out = []
        async for payload in s.events():
            out.append(payload)
            if len(out) == 1:
                h.lifecycle.force()
        s.close()
        assert out[-1] == "[DONE]" and json.loads(out[-2])["error"]["code"] == "server_shutting_down"
        h.check("cut:shutdown", completion=1)

    scenario(body)


# ---- the client goes away ----

@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_client_that_disconnects_cancels_the_jobs(stream):
    async def body():
        h = Harness()
        task = asyncio.ensure_future(h.call(stream))
        await h.submitted()
        h.engine.tokens(h.engine.tickets[0], b"ab")
        result = await task if stream else None
        h.gone.set()
        if stream:
            out = [payload async for payload in result.events()]
            result.close()
            assert out[-1] == "[DONE]"
        else:
            assert (await task)["choices"][0]["text"] == "ab"
        h.check("client_gone", completion=2)

    scenario(body)


# ---- a normal end ----

@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_request_that_ends_by_itself_is_done_and_cancels_nothing(stream):
    async def body():
        h = Harness()
        task = asyncio.ensure_future(h.call(stream, n=2))
        await h.submitted(2)
        for ticket in h.engine.tickets:
            h.engine.tokens(ticket, b"ok")
            h.engine.finish(ticket)
        result = await task
        if stream:
            out = [payload async for payload in result.events()]
            result.close()
            assert out[-1] == "[DONE]"
        else:
            assert [c["text"] for c in result["choices"]] == ["ok", "ok"]
        h.check("done", finished_by_engine=2, completion=4)

    scenario(body)


# ---- the owner itself ----

def test_leaving_the_owner_for_any_reason_ends_the_request_once():
    async def body():
        lifecycle = CountingLifecycle()
        for exc, outcome in [(None, "done"), (APIError(400, "x", code="bad"), "error:bad"),
                             (RuntimeError("bug"), "error:internal_error"), (asyncio.CancelledError(), "client_gone")]:
            record = RequestRecord("r")
            with pytest.raises(type(exc)) if exc is not None else nullcontext():
                async with Generation(record, lifecycle, retry_after=1, disconnected=_never):
                    if exc is not None:
                        raise exc
            assert record.outcome == outcome
        assert (lifecycle.enters, lifecycle.leaves) == (4, 4) and not lifecycle.active

    scenario(body)


def test_a_handed_over_generation_is_ended_by_its_stream_not_by_the_handler():
    async def body():
        lifecycle = CountingLifecycle()
        record = RequestRecord("r")
        async with Generation(record, lifecycle, retry_after=1, disconnected=_never) as gen:
            handed = gen.hand_over("body")
        assert handed == "body" and lifecycle.active and record.outcome is None
        gen.finish(None)
        gen.finish(APIError(400, "x", code="late"))
        assert record.outcome == "done" and (lifecycle.enters, lifecycle.leaves) == (1, 1)

    scenario(body)


def test_no_generation_is_admitted_once_stopping():
    async def body():
        lifecycle = CountingLifecycle()
        lifecycle.stopping.set()
        record = RequestRecord("r")
        with pytest.raises(APIError) as err:
            async with Generation(record, lifecycle, retry_after=3, disconnected=_never):
                raise AssertionError("admitted while stopping")
        assert err.value.code == "server_shutting_down" and record.outcome == "error:server_shutting_down"
        assert lifecycle.enters == lifecycle.leaves == 0

    scenario(body)


async def _never() -> None:
    await asyncio.Event().wait()
