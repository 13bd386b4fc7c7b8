"""Plain data types that cross the boundary between the server and the engine workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends.grammar import Constraint


class FinishReason(str, Enum):
    """Why a generation ended."""

    STOP = "stop"  # EOS token (stop sequences are applied by the server)
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # the server asked the worker to stop


class ErrorKind(str, Enum):
    """Engine-side failure categories the server maps to HTTP errors."""

    CONTEXT_LENGTH = "context_length_exceeded"
    INVALID_REQUEST = "invalid_request"
    QUEUE_TIMEOUT = "queue_timeout"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


@dataclass(frozen=True)
class SamplingParams:
    """Engine sampling parameters, already validated and mapped from the API."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k (all tokens)
    repetition_penalty: float = 1.0
    last_n_tokens: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int = 0
    constraint: Constraint | None = None  # structured output: only grammar-allowed tokens are sampled

    @property
    def greedy(self) -> bool:
        """True when decoding must pick the most likely token."""
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class GenerationJob:
    """One generation: a prompt (text or token ids), limits and sampling parameters."""

    job_id: int
    prompt: str | list[int]
    max_tokens: int | None  # None: up to the context length
    sampling: SamplingParams
    logprobs: int | None = None  # number of top alternatives per token; None = off
    time_limit: float | None = None  # seconds of generation; then it ends as LENGTH
    reuse_prefix: bool = True  # keep the common token prefix with the worker's previous sequence
    embed: bool = False  # read the prompt and emit its Embedding instead of generating (batched engine only)


@dataclass(frozen=True)
class Started:
    """The prompt was accepted and evaluated; generation begins."""

    job_id: int
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens reused from the worker's previous sequence


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one token and its top alternatives."""

    logprob: float
    top: list[tuple[bytes, float]]


@dataclass(frozen=True)
class Tokens:
    """One or more generated tokens (batched when the reader is slower than the engine)."""

    job_id: int
    ids: list[int]
    pieces: list[bytes]
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Embedding:
    """An embedding job's result: the mean of its prompt's final hidden states (after ln_f), L2-normalised,
    as little-endian float32 bytes. Followed by Finished(STOP, 0)."""

    job_id: int
    vector: bytes


@dataclass(frozen=True)
class Finished:
    """The generation ended normally."""

    job_id: int
    reason: FinishReason
    completion_tokens: int
    timed_out: bool = False  # ended by the time limit (reason is LENGTH)


@dataclass(frozen=True)
class Failed:
    """The generation could not run or broke."""

    job_id: int
    kind: ErrorKind
    message: str
    retry_after: int | None = None  # seconds until a retry can succeed (crash cooldown); None = unknown


@dataclass(frozen=True)
class ModelLimits:
    """What a worker reports once its model is loaded."""

    n_ctx: int
    n_vocab: int
    eos_token_id: int


Event = Started | Tokens | Embedding | Finished | Failed
