"""The request logic: resolve the model, plan, run on the pool, aggregate or stream."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

from backends.engine_api import Engines
from backends.registry import Registry, ServedModel
from backends.types import Failed, Finished, FinishReason, Started, Tokens
from server.embeddings import can_embed
from server.embeddings import create as create_embeddings
from server.errors import APIError, model_not_downloaded, model_not_found, model_unavailable
from server.lifecycle import Lifecycle
from server.lifetime import Generation
from server.metrics import Metrics
from server.middleware import RequestRecord
from server.params import BIG_WORK, Plan, chat_plan, completion_plan, work_size
from server.protocol import ChatCompletionRequest, CompletionRequest, Delta, ModelCard, ModelList
from server.protocol.embeddings import EmbeddingRequest
from server.protocol.responses import EmbeddingInfo
from server.render import Renderer, chat_logprobs, completion_logprobs, dumps, usage
from server.request_watch import CLOSED, Guard, Watch
from server.runner import Run
from server.settings import Settings
from server.streaming import ChoiceState, TextAssembler
from server.tools import CallSplitter, split_reply
from server.tracking import Tracker


class InferenceService:
    """What the routes call: one method per endpoint."""

    def __init__(self, registry: Registry, pool: Engines, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.started_at = int(time.time())
        self._names = registry.names()

    # ---- models ----
    def served(self) -> list[ServedModel]:
        """Models whose workers are loaded and that are not in a crash cooldown."""
        statuses = self.pool.status()
        return [m for m in self.registry.served
                if (s := statuses.get(m.spec.id)) is not None and s.started and s.available]

    def resolve(self, name: str, record: RequestRecord | None = None) -> ServedModel:
        """A served model by id or alias; else 404 (unknown, or registered but not downloaded) or 503
        (registered but it could not be loaded). Never a silent default. The record names the model."""
        model = self._names.get(name)
        if model is not None:
            if record is not None:
                record.model = model.spec.id
            if self.pool.get(model.spec.id) is not None:
                return model
            # the reason (which can name server files) is in the log and in /ready's details, not here
            raise model_unavailable(model.spec.id, "registered but its workers could not load it (the server "
                                                   "log and /ready say why)", self._retry_in(model.spec.id))
        found = self.registry.unserved(name)
        if found is None:
            raise model_not_found(name)
        model_id, reason = found
        if record is not None:
            record.model = model_id
        if model_id in self.registry.not_downloaded:
            raise model_not_downloaded(model_id, reason)
        raise model_unavailable(model_id, reason, self.settings.retry_after)

    def _retry_in(self, model_id: str) -> int:
        """Seconds until the pool tries to start a model that failed to load again."""
        retry_in = getattr(self.pool, "retry_in", None)
        return (retry_in(model_id) if retry_in else None) or self.settings.retry_after

    def list_models(self) -> dict:
        """GET /v1/models."""
        return ModelList(data=[self._card(m) for m in self.served()]).wire()

    def get_model(self, name: str, record: RequestRecord | None = None) -> dict:
        """GET /v1/models/{id}."""
        return self._card(self.resolve(name, record)).wire()

    def _card(self, m: ServedModel) -> ModelCard:
        info = EmbeddingInfo(dimensions=m.info.n_embd) if can_embed(m) else None
        return ModelCard(id=m.spec.id, created=self.started_at, owned_by=m.spec.owned_by, embedding=info)

    # ---- embeddings ----
    async def embeddings(self, req: EmbeddingRequest, disconnected: Callable, record: RequestRecord,
                         lifecycle: Lifecycle | None = None) -> dict:
        """POST /v1/embeddings (server/embeddings.py)."""
        return await create_embeddings(self, req, disconnected, record, lifecycle)

    # ---- generation ----
    async def completions(self, req: CompletionRequest, disconnected: Callable, record: RequestRecord,
                          lifecycle: Lifecycle | None = None) -> dict | _Stream:
        """POST /v1/completions."""
        return await self._generate(req, completion_plan, "cmpl", disconnected, record, lifecycle, chat=False)

    async def chat(self, req: ChatCompletionRequest, disconnected: Callable, record: RequestRecord,
                   lifecycle: Lifecycle | None = None) -> dict | _Stream:
        """POST /v1/chat/completions."""
        return await self._generate(req, chat_plan, "chatcmpl", disconnected, record, lifecycle, chat=True)

    async def _generate(self, req, plan_fn: Callable, prefix: str, disconnected: Callable,
                        record: RequestRecord, lifecycle: Lifecycle | None, chat: bool) -> dict | _Stream:
        """Resolve the model, then admit, plan and run the request inside its one owner (see Generation)."""
        try:
            model = self.resolve(req.model, record)
        except APIError as exc:
            record.outcome = f"error:{exc.code}"
            raise
        async with Generation(record, lifecycle, self.settings.retry_after, disconnected) as gen:
            plan = await _build(plan_fn, req, model, self.settings)
            pool = self.pool.get(model.spec.id)
            if pool is None:
                raise model_not_found(model.spec.id)
            run = Run(pool, plan, self.settings.retry_after, self.settings.request_timeout or None)
            states = self._states(plan)
            gen.launch(run, Tracker(self.metrics, model.spec.id, record, run, states))
            renderer = Renderer(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model.spec.id,
                                plan.include_usage)
            if plan.stream:
                await gen.first()  # queue timeouts and early failures are still HTTP errors
                body = _ChatStream if chat else _CompletionStream
                return gen.hand_over(body(run, plan, renderer, states, gen.watch, gen.tracker))
            await _collect(gen, states)
            return _chat_body(renderer, plan, states) if chat else _completion_body(renderer, plan, states)

    def _states(self, plan: Plan) -> list[ChoiceState]:
        states = []
        for index in range(len(plan.prompts) * plan.n):
            state = ChoiceState(index, TextAssembler(plan.stops))
            state.prompt_tokens = len(plan.prompts[index // plan.n])
            state.echo = plan.echo_texts[index // plan.n] if plan.echo else ""
            states.append(state)
        return states


async def _build(plan_fn: Callable, req, model: ServedModel, settings: Settings) -> Plan:
    """The plan; one with much to check or tokenize is built in a thread, so other requests are not stalled."""
    if work_size(req, settings) < BIG_WORK:
        return plan_fn(req, model, settings)
    return await asyncio.to_thread(plan_fn, req, model, settings)


def _apply(run: Run, state: ChoiceState, event: object) -> str:
    """Feed one event into a choice; returns released text. Failures raise APIError."""
    if state.finish_reason is not None:
        return ""
    if isinstance(event, Started):
        state.cached_tokens = event.cached_tokens
        return ""
    if isinstance(event, Tokens):
        out = []
        lps = event.logprobs or [None] * len(event.pieces)
        for piece, lp in zip(event.pieces, lps):
            out.append(state.add(piece, lp))
            if state.assembler.stopped:
                state.finish_reason = "stop"
                run.cancel(state.index)
                break
        return "".join(out)
    if isinstance(event, Finished):
        tail = state.close()
        state.finish_reason = "length" if event.reason == FinishReason.LENGTH else "stop"
        return tail
    if isinstance(event, Failed):
        raise run.fail(event)
    return ""


async def _collect(gen: Generation, states: list[ChoiceState]) -> None:
    """Consume every event of a non-streamed request."""
    async for index, event in gen.run.events():
        gen.see(index, event)
        _apply(gen.run, states[index], event)


def _usage(plan: Plan, states: list[ChoiceState]):
    firsts = [s for s in states if s.index % plan.n == 0]
    return usage(sum(s.prompt_tokens for s in firsts), sum(s.completion_tokens for s in states),
                 sum(s.cached_tokens for s in firsts))


def _completion_lp(plan: Plan, s: ChoiceState, records: list, always: bool = False):
    """Legacy logprobs for released records (text offsets count an echoed prompt)."""
    if plan.logprobs is None or not (records or always):
        return None
    return completion_logprobs(records, len(s.echo))


def _completion_body(r: Renderer, plan: Plan, states: list[ChoiceState]) -> dict:
    from server.protocol import CompletionChoice

    choices = []
    for s in states:
        lp = _completion_lp(plan, s, s.take_records(final=True), always=True)
        choices.append(CompletionChoice(text=s.echo + s.full_text, index=s.index, logprobs=lp,
                                        finish_reason=s.finish_reason))
    return r.completion(choices, _usage(plan, states))


def _chat_body(r: Renderer, plan: Plan, states: list[ChoiceState]) -> dict:
    choices = []
    for s in states:
        lp = chat_logprobs(s.take_records(final=True)) if plan.logprobs is not None else None
        if plan.tools is None:
            choices.append(r.chat_choice(s.index, s.full_text, s.finish_reason or "stop", lp))
            continue
        reply = split_reply(s.full_text, plan.tools.marker)
        choices.append(r.chat_choice(s.index, reply.text, s.finish_reason or "stop", lp, reply.calls,
                                     plan.tools.legacy))
    return r.chat(choices, _usage(plan, states))


class _Stream:
    """Common streaming loop: events -> chunks; every stream ends with its last chunk or an error event,
    then [DONE]. The request's owner (the watch's guard: a Generation handed over to this body) is ended
    when the generator ends, however it ends, or by `close`, which the route calls once the response is
    over (so a stream that never started still ends its request; later calls do nothing)."""

    def __init__(self, run: Run, plan: Plan, r: Renderer, states: list[ChoiceState], watch: Watch,
                 tracker: Tracker) -> None:
        self.run, self.plan, self.r, self.states = run, plan, r, states
        self.life: Guard = watch.guard
        self.life.own(run, watch, tracker)

    async def events(self) -> AsyncIterator[str]:
        """The SSE data payloads, ending with [DONE]; tokens that arrived together share a chunk."""
        ended: BaseException | None = CLOSED  # unless it ends by itself: the client went away
        try:
            for chunk in self.opening():
                yield dumps(chunk)
            async for first in self.run.events():
                for chunk in self._batch([first, *self.run.drain()]):
                    yield chunk
            if self.plan.include_usage:
                yield dumps(self.usage_chunk(_usage(self.plan, self.states)))
            ended = None
        except Exception as exc:  # an engine failure, the shutdown cut or a bug: an error event, then [DONE]
            ended = self.life.failure(exc)
            yield dumps(ended.body())
        finally:
            self.life.finish(ended)
        yield "[DONE]"

    def close(self) -> None:
        """End the request if the stream did not (the first end counts)."""
        self.life.finish(CLOSED)

    def _batch(self, batch: list[tuple[int, object]]) -> list[str]:
        """Apply a batch of events; one delta chunk per choice (plus its finish chunk)."""
        texts: dict[int, list[str]] = {}
        finished: list[int] = []
        for index, event in batch:
            self.life.see(index, event)
            state = self.states[index]
            was_open = state.finish_reason is None
            texts.setdefault(index, []).append(_apply(self.run, state, event))
            if was_open and state.finish_reason is not None:
                finished.append(index)
        out: list[str] = []
        for index, parts in texts.items():
            out += self.deltas(self.states[index], "".join(parts), index in finished)
        return out

    def opening(self) -> list[dict]:
        return []

    def deltas(self, s: ChoiceState, text: str, finished: bool) -> list[str]:
        raise NotImplementedError

    def usage_chunk(self, use) -> dict:
        raise NotImplementedError


class _CompletionStream(_Stream):
    def opening(self) -> list[dict]:
        out = []
        for s in self.states:
            if s.echo:
                out.append(self.r.completion_chunk(s.index, s.echo, None))
        return out

    def deltas(self, s: ChoiceState, text: str, finished: bool) -> list[str]:
        out = []
        lp = _completion_lp(self.plan, s, s.take_records(final=finished))
        if lp:
            out.append(dumps(self.r.completion_chunk(s.index, text, None, lp)))
        elif text:
            out.append(self.r.text_chunk("completion", s.index, text))
        if finished:
            out.append(dumps(self.r.completion_chunk(s.index, "", s.finish_reason)))
        return out

    def usage_chunk(self, use) -> dict:
        return self.r.completion_usage_chunk(use)


class _ChatStream(_Stream):
    def opening(self) -> list[dict]:
        tools = self.plan.tools
        self.splitters = {s.index: CallSplitter(tools.marker) for s in self.states} if tools else {}
        return [self.r.chat_chunk(s.index, Delta(role="assistant", content=""), None) for s in self.states]

    def deltas(self, s: ChoiceState, text: str, finished: bool) -> list[str]:
        """Content (held back while it could still become a tool call), then the calls or the finish."""
        out = []
        splitter = self.splitters.get(s.index)
        reply = splitter.finish(text) if splitter and finished else None
        if splitter:
            text = splitter.feed(text) if reply is None else (reply.text or "")
        records = s.take_records(final=finished)
        lp = chat_logprobs(records) if self.plan.logprobs is not None and records else None
        if lp:
            out.append(dumps(self.r.chat_chunk(s.index, Delta(content=text), None, lp)))
        elif text:
            out.append(self.r.text_chunk("chat", s.index, text))
        if reply is not None and reply.calls:
            return out + [dumps(c) for c in self.r.call_chunks(s.index, reply.calls, self.plan.tools.legacy)]
        if finished:
            out.append(dumps(self.r.chat_chunk(s.index, Delta(), s.finish_reason)))
        return out

    def usage_chunk(self, use) -> dict:
        return self.r.chat_usage_chunk(use)
