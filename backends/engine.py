"""The only module that imports ctransformers: a token-level GPT-J engine with its pitfalls handled."""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from backends.budget import ContextOverflow, generation_budget
from backends.ggml.reader import inspect_model, read_vocab
from backends.grammar import GrammarError, Matcher, Vocab, grammar_failure, vocab_for
from backends.types import (
    ErrorKind,
    Failed,
    Finished,
    FinishReason,
    GenerationJob,
    ModelLimits,
    SamplingParams,
    Started,
    TokenLogprob,
    Tokens,
)

log = logging.getLogger(__name__)

EMBED_UNSUPPORTED = ("the ctransformers engine cannot compute embeddings of GPT-J models (it gives no hidden "
                     "states); serve the model with `engine: ggml`")
MAX_BATCH = 32  # larger first batches overflow ctransformers' scratch pool (engine-facts.md)
NON_FINITE = ("the model produced non-finite logits (NaN or infinity): its weights are probably corrupt; "
              "check or re-download the model file")


def cpu_library() -> str:
    """Pick ctransformers' CPU build from /proc/cpuinfo (skips its slow detection)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "basic"
    if "avx2" in flags:
        return "avx2"
    return "avx" if "avx" in flags else "basic"


def step_seed(seed: int, step: int) -> int:
    """Derive a per-token seed: the engine reseeds its RNG on every sample call."""
    return (seed * 1_000_003 + step * 7_919) & 0x7FFFFFFF


class Engine:
    """One loaded GPT-J model, driven token by token; not thread-safe (one per process)."""

    def __init__(self, path: str, *, threads: int = 1, batch_size: int = 8, progress=None) -> None:
        from ctransformers.llm import LLM, Config

        self.info = inspect_model(path)  # never hand a bad file to the engine
        self.pieces = read_vocab(path)
        config = Config(threads=threads, batch_size=min(batch_size, MAX_BATCH), context_length=-1)
        self._llm = LLM(str(path), "gptj", config=config, lib=cpu_library())
        self._lib = self._llm._lib
        self._ptr = self._llm._llm
        self.threads = max(1, threads)
        self.batch_size = min(max(1, batch_size), MAX_BATCH)
        self.n_ctx = self._lib.ctransformers_llm_context_length(self._ptr)
        self.n_vocab = self._lib.ctransformers_llm_vocab_size(self._ptr)
        self.eos = self._lib.ctransformers_llm_eos_token_id(self._ptr)
        self.context: list[int] = []  # tokens whose keys/values are in the engine's cache
        self.progress = progress  # a shared counter (multiprocessing RawValue) bumped per evaluation
        self._vocab: Vocab | None = None  # llguidance's view of the vocabulary, built for the first grammar

    def beat(self) -> None:
        """Show progress to the server's watchdog (one shared-memory increment)."""
        if self.progress is not None:
            self.progress.value += 1

    @property
    def limits(self) -> ModelLimits:
        """The model's context size, vocabulary size and EOS id."""
        return ModelLimits(n_ctx=self.n_ctx, n_vocab=self.n_vocab, eos_token_id=self.eos)

    def tokenize(self, text: str) -> list[int]:
        """Tokenize with the engine's tokenizer, sizing the buffer by UTF-8 bytes (no overflow)."""
        data = text.encode("utf-8")
        buf = (ctypes.c_int * (len(data) + 1))()
        n = self._lib.ctransformers_llm_tokenize(self._ptr, data, False, buf)
        return buf[:n]

    def _eval(self, tokens: list[int]) -> None:
        """Evaluate tokens after the cached context, batch_size at a time (as the engine would),
        showing progress after each chunk so a long prompt is not taken for a hung worker."""
        step = self.batch_size
        for start in range(0, len(tokens), step):
            chunk = tokens[start : start + step]
            arr = (ctypes.c_int * len(chunk))(*chunk)
            ok = self._lib.ctransformers_llm_batch_eval(
                self._ptr, arr, len(chunk), len(self.context), step, self.threads
            )
            if not ok:
                self.context.clear()
                raise RuntimeError("the engine failed to evaluate tokens")
            self.context.extend(chunk)
            self.beat()

    def prefill(self, prompt: list[int], reuse: bool = True) -> int:
        """Evaluate a prompt, reusing the longest common prefix with the cached context if allowed."""
        ctx = self.context
        limit = min(len(prompt) - 1, len(ctx)) if reuse else 0  # always evaluate at least one token for logits
        common = 0
        while common < limit and prompt[common] == ctx[common]:
            common += 1
        del ctx[common:]
        self._eval(prompt[common:])
        return common

    def logits(self) -> np.ndarray:
        """A writable view of the last position's logits in the engine's own buffer."""
        size = self._lib.ctransformers_llm_logits_size(self._ptr)
        data = self._lib.ctransformers_llm_logits_data(self._ptr)
        return np.ctypeslib.as_array(data, shape=(size,))[size - self.n_vocab :]

    def sample(self, params: SamplingParams, step: int, allowed: int | None = None) -> int:
        """Sample the next token with the engine's sampler (greedy as top_k=1, never temperature 0);
        `allowed` (tokens a grammar left finite) caps top_k so no -inf logit is ever a candidate."""
        greedy = params.greedy
        top_k = 1 if greedy else (params.top_k if 0 < params.top_k <= self.n_vocab else self.n_vocab)
        if allowed is not None:
            top_k = min(top_k, allowed)
        temperature = 1.0 if greedy else params.temperature
        penalised = params.repetition_penalty != 1.0 and params.last_n_tokens > 0
        last = self.context[-params.last_n_tokens :] if penalised else []
        arr = (ctypes.c_int * len(last))(*last)
        return self._lib.ctransformers_llm_sample(
            self._ptr, arr, len(last), top_k, params.top_p, temperature,
            params.repetition_penalty, step_seed(params.seed, step),
        )

    def is_eos(self, token: int) -> bool:
        """True for the end-of-text token."""
        return bool(self._lib.ctransformers_llm_is_eos_token(self._ptr, token))

    def run(self, job: GenerationJob, should_stop: Callable[[], bool]) -> Iterator[object]:
        """Run one job, yielding Started, Tokens…, then Finished or Failed."""
        if job.embed:  # ctransformers' GPT-J gives no hidden states (its embed() returns an empty list)
            yield Failed(job.job_id, ErrorKind.INVALID_REQUEST, EMBED_UNSUPPORTED)
            return
        try:
            prompt = self.tokenize(job.prompt) if isinstance(job.prompt, str) else list(job.prompt)
            budget = self._budget(job, prompt)
        except ContextOverflow as exc:
            yield Failed(job.job_id, ErrorKind.CONTEXT_LENGTH, str(exc))
            return
        except ValueError as exc:
            yield Failed(job.job_id, ErrorKind.INVALID_REQUEST, str(exc))
            return
        cached = self.prefill(prompt, job.reuse_prefix)
        yield Started(job.job_id, len(prompt), cached)
        if not np.isfinite(self.logits()).all():  # once per job: corrupt weights that passed inspection
            self.context.clear()
            yield Failed(job.job_id, ErrorKind.INTERNAL, NON_FINITE)
            return
        yield from self._decode(job, budget, should_stop)

    def _budget(self, job: GenerationJob, prompt: list[int]) -> int:
        """How many tokens may be generated; raises when the request cannot fit."""
        return generation_budget(prompt, job.max_tokens, self.n_ctx, self.n_vocab)

    def _decode(self, job: GenerationJob, budget: int, should_stop: Callable[[], bool]) -> Iterator[object]:
        """The per-token loop: sample, report, evaluate; stops between tokens when asked."""
        params = job.sampling
        shaping = bool(params.frequency_penalty or params.presence_penalty or params.logit_bias)
        try:
            matcher = self._matcher(params)
        except GrammarError as exc:
            yield Failed(job.job_id, ErrorKind.INVALID_REQUEST, f"invalid grammar: {exc}")
            return
        counts: dict[int, int] = {}
        produced = 0
        reason = FinishReason.LENGTH
        deadline = time.monotonic() + job.time_limit if job.time_limit is not None else None
        timed_out = False
        while produced < budget:
            if should_stop():
                reason = FinishReason.CANCELLED
                break
            if deadline is not None and time.monotonic() > deadline:
                timed_out = True
                break
            lp = allowed = None
            if shaping or job.logprobs is not None or matcher:  # only then is a numpy view of the logits needed
                logits = self.logits()
                if not np.isfinite(logits).all():
                    self.context.clear()
                    yield Failed(job.job_id, ErrorKind.INTERNAL, NON_FINITE)
                    return
                lp = top_logprobs(logits, job.logprobs) if job.logprobs is not None else None
                if shaping:
                    shape_logits(logits, params, counts)
                if matcher:  # after the logprobs: they report the model's own probabilities
                    allowed = matcher.mask(logits)
                    if matcher.error or not allowed:
                        yield Failed(job.job_id, ErrorKind.INTERNAL, grammar_failure(matcher))
                        return
            token = self.sample(params, produced, allowed)
            if self.is_eos(token):
                reason = FinishReason.STOP
                break
            produced += 1
            counts[token] = counts.get(token, 0) + 1
            logprob = None if lp is None else [self._logprob_of(lp, token)]
            yield Tokens(job.job_id, [token], [self.pieces[token]], logprob)
            if matcher:
                matcher.accept(token)
                if matcher.error:
                    yield Failed(job.job_id, ErrorKind.INTERNAL, grammar_failure(matcher))
                    return
                if matcher.done:  # the grammar is complete: nothing but EOS may follow
                    reason = FinishReason.STOP
                    break
            if produced < budget:
                self._eval([token])
        yield Finished(job.job_id, reason, produced, timed_out)

    def _matcher(self, params: SamplingParams) -> Matcher | None:
        """The grammar matcher of a constrained job (the vocabulary is built once per process), else None."""
        if params.constraint is None:
            return None
        if self._vocab is None:
            self._vocab = vocab_for(self.pieces, self.eos)
        return Matcher(params.constraint, self._vocab)

    def _logprob_of(self, lp: tuple[np.ndarray, np.ndarray, np.ndarray], token: int) -> TokenLogprob:
        """Package a token's log-probability with the top alternatives."""
        logz, top_ids, raw = lp
        top = [(self.pieces[int(i)], float(raw[i] - logz)) for i in top_ids]
        return TokenLogprob(float(raw[token] - logz), top)


def top_logprobs(logits: np.ndarray, k: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Log-normaliser, the k most likely ids (best first) and a copy of the raw logits."""
    raw = np.array(logits, dtype=np.float64)
    peak = raw.max()
    logz = peak + np.log(np.exp(raw - peak).sum())
    if k <= 0:
        return logz, np.empty(0, dtype=np.int64), raw
    k = min(k, raw.size)
    ids = np.argpartition(-raw, k - 1)[:k]
    ids = ids[np.argsort(-raw[ids], kind="stable")]
    return logz, ids, raw


def shape_logits(logits: np.ndarray, params: SamplingParams, counts: dict[int, int]) -> None:
    """Apply OpenAI's frequency/presence penalties and logit_bias in place."""
    for token, count in counts.items():
        logits[token] -= count * params.frequency_penalty + params.presence_penalty
    for token, bias in params.logit_bias.items():
        if 0 <= token < logits.size:
            logits[token] += bias
