"""POST /v1/embeddings: inputs to token ids, one embedding job per input on the batched engine, the vectors.

A vector is the mean over an input's tokens of GPT-J's final hidden states (after the final layer norm ln_f,
before lm_head), L2-normalised; the engine computes it (backends.batched.scheduler). A request's inputs run
as jobs of one Run, at most the engine's slots at once: the next input is submitted as one ends, so a request
of many inputs holds at most the engine's slots and one place in its queue (so the queue stays open to other
requests), and inputs of this and of concurrent requests are read in the same engine steps.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from backends.budget import ContextOverflow, embedding_fits
from backends.engine_api import Engine, ModelUnavailable, QueueFull
from backends.registry import ServedModel
from backends.types import Embedding, ErrorKind, Failed, Finished, FinishReason, GenerationJob, SamplingParams
from server.errors import APIError, bad_request, internal_error, json_text, model_not_found
from server.lifecycle import Lifecycle
from server.lifetime import Generation
from server.middleware import RequestRecord
from server.protocol.embeddings import EmbeddingRequest, embedding_list
from server.runner import Run
from server.tracking import Tracker

EMBEDDING_ENGINE = "ggml"  # the engine that gives hidden states (ctransformers' GPT-J does not)
BIG_INPUT = 64 * 1024  # characters to tokenize (or token ids to check) beyond which it is done in a thread
BIG_BODY = 64 * 1024  # numbers in the vectors beyond which the body is built and rendered in a thread
RETRY_SUBMIT = 0.05  # seconds before trying again to queue the next input after a full queue
_WAKE = object()  # put into a run's sink when it is cancelled with inputs not yet submitted


@dataclass
class EmbedPlan:
    """What the Run needs of a plan: the inputs' token ids and the field an error is blamed on."""

    prompts: list[list[int]]
    n: int = 1
    prompt_param: str = "input"


@dataclass
class InputCount:
    """One input's tokens, for the request's accounting (Tracker)."""

    index: int
    prompt_tokens: int
    completion_tokens: int = 0


def can_embed(model: ServedModel) -> bool:
    """Whether the model's engine computes embeddings."""
    return model.spec.engine == EMBEDDING_ENGINE


def check_model(model: ServedModel, req: EmbeddingRequest) -> None:
    """400 unless the model's engine can embed and `dimensions` (if given) is its n_embd."""
    if not can_embed(model):
        raise APIError(400, f"The model `{model.spec.id}` is served by the {model.spec.engine} engine, which "
                            f"cannot compute embeddings (it gives no hidden states). Embeddings come from the "
                            f"batched engine: set `engine: {EMBEDDING_ENGINE}` on this model in the registry.",
                       param="model", code="unsupported_engine")
    size = model.info.n_embd
    if req.dimensions is not None and req.dimensions != size:
        raise bad_request(f"This model's embeddings have {size} dimensions, and they are not shortened: "
                          f"`dimensions` must be {size} or left out (got {req.dimensions}).", "dimensions",
                          "invalid_value")


def _items(value: object) -> list:
    """The inputs of OpenAI's four shapes as a list: texts or token-id lists."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise bad_request("'input' is empty: give a text, a list of texts, a list of token ids or a list of "
                          "token-id lists.", "input", "invalid_value")
    return [value] if isinstance(value[0], int) else list(value)


def input_tokens(value: object, model: ServedModel, max_inputs: int) -> list[list[int]]:
    """Token ids of every input (the model's tokenizer); 400 naming `input` (and the item) when there are none
    or too many, an input is empty, has an id outside the vocabulary or is longer than the context."""
    items = _items(value)
    if len(items) > max_inputs:
        raise bad_request(f"'input' has {len(items)} items; this server takes at most {max_inputs} in one request "
                          "(max_embedding_inputs).", "input", "too_many_inputs")
    n_ctx, n_vocab = model.context_length, model.info.n_vocab
    out = []
    for i, item in enumerate(items):
        name = "input" if isinstance(value, str) or (value and isinstance(value[0], int)) else f"input[{i}]"
        try:
            ids = _encode(item, model, n_ctx) if isinstance(item, str) else item
            embedding_fits(ids, n_ctx, n_vocab)
        except ContextOverflow:
            more = "more than " if isinstance(item, str) else ""  # the tokenizer stops past the context
            raise APIError(400, f"This model's maximum context length is {n_ctx} tokens, however {name} has "
                                f"{more}{n_ctx if more else len(ids)} tokens. Please shorten it.",
                           param="input", code="context_length_exceeded") from None
        except UnicodeEncodeError:
            raise bad_request(f"{name} is not valid Unicode (it contains a lone surrogate).", "input",
                              "invalid_unicode") from None
        except ValueError as exc:
            raise bad_request(f"Invalid {name}: {exc}.", "input", "invalid_value") from None
        out.append(ids)
    return out


def _encode(text: str, model: ServedModel, n_ctx: int) -> list[int]:
    """A text's token ids (at most n_ctx + 1: the tokenizer stops past the context); ValueError if it is empty,
    UnicodeEncodeError if it holds a lone surrogate (JSON can carry one, UTF-8 cannot)."""
    if not text:
        raise ValueError("the text is empty")
    return model.tokenizer.encode(text, n_ctx)


async def tokens_of(req: EmbeddingRequest, model: ServedModel, max_inputs: int) -> list[list[int]]:
    """input_tokens, in a thread when there is much text (other requests are not stalled meanwhile)."""
    value = req.input
    size = len(value) if isinstance(value, str) else sum(len(v) if isinstance(v, (str, list)) else 1 for v in value)
    if size < BIG_INPUT:
        return input_tokens(value, model, max_inputs)
    return await asyncio.to_thread(input_tokens, value, model, max_inputs)


class EmbeddingRun(Run):
    """One embedding job per input, at most the engine's slots of them at once; the next is queued as one ends."""

    def __init__(self, pool: Engine, plan: EmbedPlan, retry_after: int) -> None:
        super().__init__(pool, plan, retry_after)
        self._next = 0  # the first input not yet submitted
        self._flying: set[int] = set()  # inputs submitted and not ended
        self._stopped = False
        self._timer: asyncio.TimerHandle | None = None

    def submit(self) -> None:
        """Queue the first input (a full queue is a 503, as for generation), then more while the engine has idle
        slots: a request waits in the queue with one input at most, so the queue stays open to others."""
        self._open = set(range(len(self.plan.prompts)))
        try:
            self._submit_next()
        except (QueueFull, ModelUnavailable) as exc:
            self.cancel()
            raise self.refused(exc) from None
        self._refill(replace=False)

    def _submit_next(self) -> None:
        index = self._next
        job = GenerationJob(job_id=self.pool.new_job_id(), prompt=self.plan.prompts[index], max_tokens=0,
                            sampling=SamplingParams(), reuse_prefix=False, embed=True)
        self.queue(index, job)
        self._next += 1
        self._flying.add(index)

    def _refill(self, replace: bool = True) -> None:
        """Queue the next input in place of one that ended (`replace`), and more while slots are idle; after a
        full queue with nothing of ours left to end, a timer tries again."""
        self._timer = None
        status = self.pool.status()
        while not self._stopped and self._next < len(self.plan.prompts) and len(self._flying) < status.slots:
            if not replace and status.running + status.queued >= status.slots:
                return
            try:
                self._submit_next()
            except QueueFull:
                if not self._flying:
                    self._timer = asyncio.get_running_loop().call_later(RETRY_SUBMIT, self._refill)
                return
            except ModelUnavailable as exc:  # the refused input fails the request
                self.sink.put_nowait((self._next, Failed(0, ErrorKind.UNAVAILABLE, str(exc), exc.retry_after)))
                self._stop_submitting(keep=self._next)
                return
            replace, status = False, self.pool.status()

    def _track(self, event: object, index: int) -> None:
        super()._track(event, index)
        if isinstance(event, (Finished, Failed)) and index in self._flying:
            self._flying.discard(index)
            if isinstance(event, Finished) and event.reason == FinishReason.STOP:
                self._refill()

    def cancel(self, index: int | None = None) -> None:
        """Cancel one job, or every job and submit no more."""
        super().cancel(index)
        if index is None:
            self._stop_submitting()

    def _stop_submitting(self, keep: int | None = None) -> None:
        """Submit no more inputs; those never submitted (but `keep`, whose failure is on its way) are no longer
        awaited by the run's events (a marker wakes them if nothing else would)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stopped = True
        unsent = set(range(self._next, len(self.plan.prompts))) - {keep}
        if unsent & self._open:
            self._open -= unsent
            self.sink.put_nowait((-1, _WAKE))


async def create(service, req: EmbeddingRequest, disconnected, record: RequestRecord,
                 lifecycle: Lifecycle | None = None) -> dict:
    """POST /v1/embeddings for an InferenceService: resolve, check, run every input, the response body."""
    try:
        model = service.resolve(req.model, record)
    except APIError as exc:
        record.outcome = f"error:{exc.code}"
        raise
    settings = service.settings
    async with Generation(record, lifecycle, settings.retry_after, disconnected) as gen:
        check_model(model, req)
        prompts = await tokens_of(req, model, settings.max_embedding_inputs)
        pool = service.pool.get(model.spec.id)
        if pool is None:
            raise model_not_found(model.spec.id)
        run = EmbeddingRun(pool, EmbedPlan(prompts), settings.retry_after)
        counts = [InputCount(i, 0) for i in range(len(prompts))]  # filled as inputs are read
        gen.launch(run, Tracker(service.metrics, model.spec.id, record, run, counts))
        vectors = await _within(settings.request_timeout, _collect(gen, run, counts))
        args = (model.spec.id, vectors, req.encoding_format or "float", sum(map(len, prompts)))
        if len(vectors) * model.info.n_embd < BIG_BODY:
            return embedding_list(*args)
        return await asyncio.to_thread(embedding_list, *args)


async def _within(limit: float, work):
    """`work`'s result, or a 503 `request_timeout` when it takes longer than `limit` seconds (0 = no limit): an
    embedding has no partial result to return, and leaving it running would let one request hold the engine
    for hours. The caller's Generation then cancels the request's jobs."""
    if not limit:
        return await work
    try:
        return await asyncio.wait_for(work, limit)
    except TimeoutError:
        raise APIError(503, f"The embedding request took longer than this server's request_timeout ({limit:g} "
                            "s) and was stopped. Send fewer or shorter inputs per request.",
                       type="server_error", code="request_timeout") from None


async def body_bytes(body: dict) -> bytes:
    """The response's JSON bytes; a large body is rendered in a thread, a vector at a time, so other requests
    (streams, health checks) are not stalled: 2048 vectors of 4096 floats take seconds to write."""
    size = sum(len(item["embedding"]) for item in body["data"])
    if size < BIG_BODY:
        return render(body)
    return await asyncio.to_thread(render, body)


async def _collect(gen: Generation, run: EmbeddingRun, counts: list[InputCount]) -> list[bytes]:
    """Every input's vector, in input order; a failure raises its HTTP error. The tokens of each input read
    are counted (metrics, access log): a request cut short counts only what the engine read."""
    vectors: list[bytes | None] = [None] * len(counts)
    async for index, event in run.events():
        gen.see(index, event)
        if isinstance(event, Embedding):
            vectors[index] = event.vector
            counts[index].prompt_tokens = len(run.plan.prompts[index])
        elif isinstance(event, Failed):
            raise run.fail(event)
    if any(v is None for v in vectors):
        if gen.client_gone:
            raise APIError(499, "The client closed the request.", code="client_closed_request")
        raise internal_error()
    return vectors


def render(body: dict) -> bytes:
    """The body as JSON bytes, exactly as JSONBody writes it, but one vector at a time: a thread rendering a
    large body lets the event loop take the GIL between vectors (one json.dumps of millions of floats holds it
    for seconds)."""
    parts = []
    for key, value in body.items():
        text = "[" + ",".join(json_text(item) for item in value) + "]" if key == "data" else json_text(value)
        parts.append(f"{json_text(key)}:{text}")
    return ("{" + ",".join(parts) + "}").encode("utf-8")
