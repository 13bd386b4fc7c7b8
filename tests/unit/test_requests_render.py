"""Nothing invalid reaches the wire: non-finite numbers become an engine error, lone surrogates are
escaped, and a stream always ends with its last chunk or an error event, then [DONE] (pure logic)."""

import asyncio
import json
import math
from types import SimpleNamespace

import pytest

from backends.types import Finished, FinishReason, Started, TokenLogprob, Tokens
from server.errors import APIError, JSONBody, json_text, model_not_found
from server.lifecycle import Lifecycle
from server.metrics import Metrics
from server.middleware import RequestRecord
from server.render import Renderer, chat_logprobs, completion_logprobs, dumps
from server.request_watch import Guard, Watch
from server.service import _ChatStream, _CompletionStream
from server.streaming import ChoiceState, TextAssembler, TokenRecord
from server.tracking import Tracker

BAD = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", BAD)
def test_a_non_finite_logprob_is_an_engine_error_not_json_nan(value):
    for lp in (TokenLogprob(value, [(b"a", -1.0)]), TokenLogprob(-1.0, [(b"a", value)])):
        record = TokenRecord(b"a", 1, lp)
        for render in (lambda: completion_logprobs([record], 0), lambda: chat_logprobs([record])):
            with pytest.raises(APIError) as err:
                render()
            assert err.value.status == 500 and err.value.code == "engine_error"


def test_dumps_never_writes_nan():
    with pytest.raises(APIError):
        dumps({"x": math.nan})
    with pytest.raises(ValueError):
        json_text({"x": math.inf})
    assert json.loads(dumps({"x": 1.5})) == {"x": 1.5}


def test_lone_surrogates_are_escaped_as_text_so_every_body_encodes():
    body = JSONBody(model_not_found("\ud800").body()).body
    assert json.loads(body)["error"]["message"].startswith("The model `\\ud800`")
    assert json.loads(json_text({"\udfff": "a\ud83db"})) == {"\\udfff": "a\\ud83db"}
    assert json_text({"a": "日\n"}) == '{"a":"日\\n"}'


def test_long_client_text_is_shortened_in_messages():
    message = model_not_found("m" * 2_000_000).message
    assert len(message) < 400 and "2000000 characters" in message


# ---- streams ----

class FakeRun:
    """A run whose jobs produce the given events (the pool is not involved)."""

    def __init__(self, events: list[tuple[int, object]], plan) -> None:
        self.sink: asyncio.Queue = asyncio.Queue()
        for e in events:
            self.sink.put_nowait(e)
        self.plan, self.handles, self.cancelled = plan, [], 0
        self._open = {i for i, _ in events}

    async def events(self):
        while self._open:
            index, event = await self.sink.get()
            if isinstance(event, Finished):
                self._open.discard(index)
            yield index, event

    def drain(self):
        return []

    def cancel(self, index=None):
        self.cancelled += 1


def plan(logprobs=None):
    return SimpleNamespace(n=1, logprobs=logprobs, include_usage=False, stops=[], prompts=[[1]], tools=None)


async def _never():
    await asyncio.Event().wait()


def stream(kind, events, lifecycle=None, logprobs=None):
    p = plan(logprobs)
    run = FakeRun(events, p)
    record = RequestRecord("r")
    guard = Guard(record, lifecycle)
    guard.admit(1)
    watch = Watch(run, guard, _never, 1)
    states = [ChoiceState(0, TextAssembler([]))]
    tracker = Tracker(Metrics(), "m", record, run, states)
    return kind(run, p, Renderer("id", 0, "m", False), states, watch, tracker), record


def run_stream(kind, events, logprobs=None) -> tuple[list[str], RequestRecord]:
    async def scenario():
        s, record = stream(kind, events, logprobs=logprobs)
        return [payload async for payload in s.events()], record

    return asyncio.run(scenario())


def strict_json(payload: str):
    """Parse as JSON, refusing NaN and Infinity (which Python's json accepts by default)."""
    def reject(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(payload, parse_constant=reject)


@pytest.mark.parametrize("kind", [_CompletionStream, _ChatStream])
def test_a_nan_logprob_in_a_stream_ends_it_with_an_error_event_and_done(kind):
    events = [(0, Started(1, 1)), (0, Tokens(1, [5], [b"a"], [TokenLogprob(math.nan, [])])),
              (0, Finished(1, FinishReason.LENGTH, 1))]
    out, record = run_stream(kind, events, logprobs=0)
    assert out[-1] == "[DONE]"
    chunks = [strict_json(payload) for payload in out[:-1]]
    assert chunks[-1]["error"]["code"] == "engine_error"
    assert record.outcome == "error:engine_error"


@pytest.mark.parametrize("kind", [_CompletionStream, _ChatStream])
def test_a_stream_that_ends_by_itself_is_done(kind):
    events = [(0, Started(1, 1)), (0, Tokens(1, [5], [b"a"])), (0, Finished(1, FinishReason.LENGTH, 1))]
    out, record = run_stream(kind, events)
    assert out[-1] == "[DONE]" and json.loads(out[-2])["choices"][0]["finish_reason"] == "length"
    assert record.outcome == "done"


def test_the_shutdown_cut_ends_a_running_stream_with_an_error_event_and_done():
    async def scenario():
        lifecycle = Lifecycle(grace=0)
        s, record = stream(_CompletionStream, [(0, Started(1, 1)), (0, Tokens(1, [5], [b"a"]))], lifecycle)
        assert lifecycle.active
        out = []
        async for payload in s.events():
            out.append(payload)
            if len(out) == 1:  # the token chunk: now the grace is over
                lifecycle.force()
        return out, record, lifecycle

    out, record, lifecycle = asyncio.run(scenario())
    assert out[-1] == "[DONE]"
    assert json.loads(out[-2])["error"]["code"] == "server_shutting_down"
    assert record.outcome == "cut:shutdown" and not lifecycle.active


def test_a_stream_closed_by_the_client_leaves_the_lifecycle_as_client_gone():
    async def scenario():
        lifecycle = Lifecycle(grace=0)
        s, record = stream(_CompletionStream, [(0, Started(1, 1)), (0, Tokens(1, [5], [b"a"]))], lifecycle)
        events = s.events()
        await events.__anext__()
        await events.aclose()
        return record, lifecycle

    record, lifecycle = asyncio.run(scenario())
    assert record.outcome == "client_gone" and not lifecycle.active


def test_a_stream_that_never_started_is_closed_by_the_route():
    async def scenario():
        lifecycle = Lifecycle(grace=0)
        s, record = stream(_ChatStream, [(0, Started(1, 1))], lifecycle)
        s.close()
        s.close()
        return record, lifecycle

    record, lifecycle = asyncio.run(scenario())
    assert record.outcome == "client_gone" and not lifecycle.active


def test_no_new_generation_once_stopping():
    async def scenario():
        lifecycle = Lifecycle(grace=5)
        lifecycle.stopping.set()
        record = RequestRecord("r")
        with pytest.raises(APIError) as err:
            Guard(record, lifecycle).admit(3)
        return err.value, record

    err, record = asyncio.run(scenario())
    assert err.status == 503 and err.code == "server_shutting_down" and err.headers == {"Retry-After": "3"}
    assert record.outcome == "error:server_shutting_down"


def test_a_partial_utf8_token_is_written_as_bytes_and_never_collides():
    """'ĸ' is c4 b8: its two byte tokens must stay distinct top_logprobs keys (before: both were U+FFFD)."""
    from server.render import token_text

    assert token_text("ĸ".encode()) == "ĸ" and token_text(b"ab") == "ab"
    assert token_text(b"\xc4") == "bytes:\\xc4" and token_text(b"\xe2\x80") == "bytes:\\xe2\\x80"
    lp = completion_logprobs([TokenRecord(b"\xc4", 0, TokenLogprob(-0.5, [(b"\xc4", -0.5), (b"\xb8", -1.0)]))], 0)
    assert lp.tokens == ["bytes:\\xc4"] and lp.top_logprobs == [{"bytes:\\xc4": -0.5, "bytes:\\xb8": -1.0}]
