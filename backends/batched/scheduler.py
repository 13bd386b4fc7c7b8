"""Continuous-batching scheduler: which sequences the batched core runs each step (pure logic, no ggml).

A `Scheduler` owns n_slots KV-cache slots and a FIFO of waiting sequences. Each step:
`plan = sched.plan_step()` admits waiting sequences into free slots (a free slot is used at once) and
returns the slot resets, the decode rows of every running sequence and at most one prompt chunk;
the caller runs it on the core (`run_plan(core, plan)`, i.e. BatchedEngine.reset + step) and hands the
result to `sched.apply(result)`, which picks each row's next token with `choose(row_logits, seq)`,
emits Started/Tokens/Finished/Failed and retires finished sequences, freeing their slots for the next
step. Events follow backends.engine.Engine (ctransformers): Started after the prompt is evaluated (cached_tokens =
prefix reused from the slot's previous sequence), EOS is not emitted nor counted, a job cancelled
before it started gets only Finished(CANCELLED, 0), prompt + max_tokens must fit the context.

An embedding job (job.embed) is read, not generated: its prompt is evaluated from position 0 of a slot (no
prefix reuse) in chunks that share steps with other embedding inputs and with generation (up to chunk +
n_slots tokens a step); the sums of its final hidden states come back with the step (BatchedEngine.step_pooled),
and once the last chunk is read it emits Started, Embedding (mean, L2-normalised) and Finished(STOP, 0), and
its slot is free at once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.budget import ContextOverflow, embedding_fits, generation_budget
from backends.types import (
    Embedding,
    ErrorKind,
    Failed,
    Finished,
    FinishReason,
    GenerationJob,
    Started,
    TokenLogprob,
    Tokens,
)

WAITING, PREFILL, RUNNING, DONE = "waiting", "prefill", "running", "done"
NON_FINITE = "the model produced non-finite logits (corrupt weights?)"
# ggml's repacked q4_0 matmul takes the batch's rows in tiles of 16 on AVX-512 (of 4 on AVX2): 16 rows cost
# about what 12 do, and leftover rows fall back to the narrow tile. A chunk longer than this is trimmed so
# that decodes + chunk is a whole number of tiles (measured: 8 decodes + 24 prompt tokens per step process
# prompt tokens at about the 32-row rate, while 8 + 32 pays the narrow tile for 8 rows).
ROW_TILE = 16


@dataclass(eq=False)
class Seq:
    """One generation as the scheduler tracks it."""

    job: GenerationJob
    prompt: list[int]
    budget: int  # tokens it may generate
    state: str = WAITING
    slot: int | None = None
    cached: int = 0  # prompt tokens reused from the slot's cache
    generated: list[int] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)  # generated token -> times (OpenAI penalties)
    deadline: float | None = None
    matcher: Any = None  # backends.grammar.Matcher of a constrained job: its mask shapes every pick
    pooled: np.ndarray | None = None  # an embedding job: the sum of its final hidden states read so far

    @property
    def tokens(self) -> list[int]:
        """Prompt followed by the tokens generated so far (the sampler's context)."""
        return self.prompt + self.generated


@dataclass(eq=False)
class Slot:
    """One KV-cache slot: the tokens it holds, its sequence, when it was last used."""

    index: int
    tokens: list[int] = field(default_factory=list)
    seq: Seq | None = None
    last_used: int = -1


@dataclass
class Plan:
    """One step for the core: resets (slot, keep) first, then decodes (slot, token), one prompt chunk and the
    chunks of embedding inputs (pooled: their final hidden states are summed, no logits)."""

    resets: list[tuple[int, int]]
    decodes: list[tuple[int, int]]
    chunk: tuple[int, list[int]] | None
    rows: list[Seq]  # the sequence of each decode row
    chunk_seq: Seq | None
    pooled: list[tuple[int, list[int]]] = field(default_factory=list)
    pooled_seqs: list[Seq] = field(default_factory=list)


def run_plan(core, plan: Plan):
    """Run a plan on a core with reset(slot, keep), step(decodes, chunk) and, when the plan reads embedding
    inputs, step_pooled(decodes, chunk, pooled) (BatchedEngine)."""
    for slot, keep in plan.resets:
        core.reset(slot, keep)
    if plan.pooled:
        return core.step_pooled(plan.decodes, plan.chunk, plan.pooled)
    return core.step(plan.decodes, plan.chunk)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


Choose = Callable[[np.ndarray, Seq], "int | tuple[int, TokenLogprob | None]"]
MatcherFor = Callable[[GenerationJob], Any]  # a job's grammar matcher (None: unconstrained); ValueError if invalid


class Scheduler:
    """Admits, steps and retires sequences over n_slots slots of a batched core; not thread-safe."""

    def __init__(self, n_slots: int, n_ctx: int, eos_token_id: int, choose: Choose, emit: Callable[[object], None],
                 chunk: int = 32, pieces: Sequence[bytes] = (), n_vocab: int | None = None,
                 clock: Callable[[], float] = time.monotonic, matcher_for: MatcherFor | None = None) -> None:
        if n_slots < 1 or chunk < 1:
            raise ValueError("need at least one slot and a chunk of at least one token")
        self.n_ctx, self.eos, self.chunk, self.n_vocab = n_ctx, eos_token_id, chunk, n_vocab
        self.choose, self.emit, self.pieces, self.clock = choose, emit, pieces, clock
        self.matcher_for = matcher_for
        self.slots = [Slot(i) for i in range(n_slots)]
        self.waiting: deque[Seq] = deque()
        self.prefilling: deque[Seq] = deque()  # admitted, prompt not fully evaluated (FIFO)
        self.sequences: dict[int, Seq] = {}  # live (waiting, prefilling or running) by job id
        self._pending: Plan | None = None
        self._tick = 0

    @property
    def running(self) -> int:
        """Sequences holding a slot (prefilling or decoding)."""
        return sum(s.seq is not None for s in self.slots)

    @property
    def queued(self) -> int:
        """Sequences waiting for a slot."""
        return len(self.waiting)

    @property
    def idle(self) -> bool:
        """Nothing to run and nothing waiting."""
        return not self.sequences

    def submit(self, job: GenerationJob, prompt: list[int] | None = None) -> bool:
        """Queue a job (token ids from `prompt`, else job.prompt); emits Failed and returns False if it cannot fit."""
        if isinstance(job.prompt, str) and prompt is None:
            raise TypeError("a text prompt needs its token ids")
        tokens = list(job.prompt) if prompt is None else list(prompt)
        if job.job_id in self.sequences:
            raise ValueError(f"job {job.job_id} is already scheduled")
        try:
            if job.embed:  # read, not generated: it only has to fit the context
                embedding_fits(tokens, self.n_ctx, self.n_vocab)
                budget, matcher = 0, None
            else:
                budget = self._budget(job, tokens)
                matcher = self.matcher_for(job) if self.matcher_for is not None else None
        except ContextOverflow as exc:
            self.emit(Failed(job.job_id, ErrorKind.CONTEXT_LENGTH, str(exc)))
            return False
        except ValueError as exc:
            self.emit(Failed(job.job_id, ErrorKind.INVALID_REQUEST, str(exc)))
            return False
        seq = Seq(job, tokens, budget, matcher=matcher)
        self.sequences[job.job_id] = seq
        self.waiting.append(seq)
        return True

    def cancel(self, job_id: int) -> bool:
        """Stop a job now: it emits Finished(CANCELLED) and its slot is free for the next step."""
        seq = self.sequences.get(job_id)
        if seq is None:
            return False
        self._retire(seq, Finished(job_id, FinishReason.CANCELLED, len(seq.generated)))
        return True

    def fail_all(self, kind: ErrorKind, message: str) -> None:
        """End every live sequence with Failed (the core broke); slot caches are forgotten."""
        for seq in list(self.sequences.values()):
            self._retire(seq, Failed(seq.job.job_id, kind, message))
        for slot in self.slots:
            slot.tokens.clear()
        self._pending = None

    def plan_step(self) -> Plan | None:
        """Admit waiting sequences into free slots; what the core runs this step (None: nothing to run)."""
        if self._pending is not None:
            raise RuntimeError("apply() the previous plan first")
        resets = []
        while self.waiting:
            free = [s for s in self.slots if s.seq is None]
            if not free:
                break
            seq = self.waiting.popleft()
            keep_of = {s.index: self._keep(seq, s) for s in free}
            slot = max(free, key=lambda s: (keep_of[s.index], -s.last_used))
            seq.state, seq.slot, seq.cached = PREFILL, slot.index, keep_of[slot.index]
            slot.seq, slot.last_used = seq, self._use()
            del slot.tokens[seq.cached:]
            resets.append((slot.index, seq.cached))
            self.prefilling.append(seq)
        rows = [s.seq for s in self.slots if s.seq is not None and s.seq.state == RUNNING]
        decodes = [(seq.slot, seq.generated[-1]) for seq in rows]
        chunk, chunk_seq = None, next((s for s in self.prefilling if not s.job.embed), None)
        if chunk_seq is not None:
            done = len(self.slots[chunk_seq.slot].tokens)
            chunk = (chunk_seq.slot, chunk_seq.prompt[done:done + self.chunk_size(len(decodes))])
        pooled, pooled_seqs = self._pooled(len(decodes) + (len(chunk[1]) if chunk else 0), bool(decodes))
        if not decodes and chunk is None and not pooled:
            return None
        self._pending = Plan(resets, decodes, chunk, rows, chunk_seq, pooled, pooled_seqs)
        return self._pending

    def _pooled(self, used: int, decoding: bool) -> tuple[list[tuple[int, list[int]]], list[Seq]]:
        """Chunks of the embedding inputs being read, FIFO, in the rows a step has left: a step evaluates at most
        chunk + n_slots tokens (the engine's memory estimate); each input holding a slot leaves a decode row
        free, so the first one always gets a token. While streams decode, embeddings only fill the row tiles
        the step uses anyway (at least one row): a step's cost grows with its tiles, so streams keep their pace
        and the embeddings lose little."""
        room = self.chunk + len(self.slots) - used
        if decoding:
            room = min(room, max(1, -used % ROW_TILE))
        chunks, seqs = [], []
        for seq in self.prefilling:
            if room <= 0:
                break
            if seq.job.embed:
                done = len(self.slots[seq.slot].tokens)
                part = seq.prompt[done:done + room]
                chunks.append((seq.slot, part))
                seqs.append(seq)
                room -= len(part)
        return chunks, seqs

    def chunk_size(self, n_decodes: int) -> int:
        """Prompt tokens to evaluate beside n_decodes decode rows: the chunk, trimmed to end on a row tile."""
        if self.chunk <= ROW_TILE:
            return self.chunk
        return self.chunk - (n_decodes + self.chunk) % ROW_TILE

    def apply(self, result: tuple) -> None:
        """Take the core's (decode logits [B, V], chunk's last logits[, pooled sums]) for the pending plan;
        advance sequences."""
        plan, self._pending = self._pending, None
        if plan is None:
            raise RuntimeError("no plan to apply")
        logits, chunk_logits, *pooled = result  # step_pooled adds the pooled chunks' sums
        for slot, token in plan.decodes:  # the cache advanced whatever happened to its sequence since
            self.slots[slot].tokens.append(token)
        if plan.chunk is not None:
            self.slots[plan.chunk[0]].tokens.extend(plan.chunk[1])
        for (slot, part), seq, total in zip(plan.pooled, plan.pooled_seqs, pooled[0] if pooled else ()):
            self.slots[slot].tokens.extend(part)
            if seq.state == PREFILL:  # not cancelled since the plan
                seq.pooled = total if seq.pooled is None else seq.pooled + total
                if len(self.slots[slot].tokens) == len(seq.prompt):
                    self._embedded(seq)
        for i, seq in enumerate(plan.rows):
            if seq.state == RUNNING:
                self._advance(seq, logits[i])
        seq = plan.chunk_seq
        if seq is not None and seq.state == PREFILL and len(self.slots[seq.slot].tokens) == len(seq.prompt):
            self.prefilling.remove(seq)
            seq.state = RUNNING
            self.emit(Started(seq.job.job_id, len(seq.prompt), seq.cached))  # as ctransformers: then the check
            if not np.isfinite(chunk_logits).all():
                self.slots[seq.slot].tokens.clear()
                self._retire(seq, Failed(seq.job.job_id, ErrorKind.INTERNAL, NON_FINITE))
                return
            seq.deadline = None if seq.job.time_limit is None else self.clock() + seq.job.time_limit
            self._advance(seq, chunk_logits)

    # internals

    def _embedded(self, seq: Seq) -> None:
        """An embedding input is read: emit Started, its normalised mean vector and Finished; free its slot."""
        job_id = seq.job.job_id
        self.prefilling.remove(seq)
        seq.state = RUNNING
        self.emit(Started(job_id, len(seq.prompt), 0))
        mean = seq.pooled / len(seq.prompt)
        norm = float(np.linalg.norm(mean))
        if not (np.isfinite(mean).all() and np.isfinite(norm) and norm > 0):
            self.slots[seq.slot].tokens.clear()
            self._retire(seq, Failed(job_id, ErrorKind.INTERNAL, NON_FINITE))
            return
        self.emit(Embedding(job_id, (mean / norm).astype("<f4").tobytes()))
        self._retire(seq, Finished(job_id, FinishReason.STOP, 0))

    def _budget(self, job: GenerationJob, prompt: list[int]) -> int:
        """Tokens the job may generate; ValueError (bad prompt) or ContextOverflow (does not fit)."""
        return generation_budget(prompt, job.max_tokens, self.n_ctx, self.n_vocab)

    def _keep(self, seq: Seq, slot: Slot) -> int:
        """Prompt tokens a slot's cache can keep for a sequence (at least one token is always evaluated; an
        embedding input is read whole, as its every hidden state is pooled)."""
        if not seq.job.reuse_prefix or seq.job.embed:
            return 0
        return min(common_prefix(seq.prompt, slot.tokens), len(seq.prompt) - 1)

    def _use(self) -> int:
        self._tick += 1
        return self._tick

    def _advance(self, seq: Seq, row: np.ndarray) -> None:
        """Pick a running sequence's next token from its logits row, emit it, retire it if it is done."""
        job = seq.job
        if len(seq.generated) >= seq.budget:
            self._retire(seq, Finished(job.job_id, FinishReason.LENGTH, len(seq.generated)))
            return
        if seq.deadline is not None and self.clock() > seq.deadline:
            self._retire(seq, Finished(job.job_id, FinishReason.LENGTH, len(seq.generated), timed_out=True))
            return
        try:  # a sampler error ends this sequence only
            picked = self.choose(row, seq)
            token, logprob = picked if isinstance(picked, tuple) else (picked, None)
            token = int(token)
        except Exception as exc:  # noqa: BLE001 - isolate one row's failure
            self._retire(seq, Failed(job.job_id, ErrorKind.INTERNAL, str(exc) or type(exc).__name__))
            return
        if token == self.eos:
            self._retire(seq, Finished(job.job_id, FinishReason.STOP, len(seq.generated)))
            return
        seq.generated.append(token)
        seq.counts[token] = seq.counts.get(token, 0) + 1
        piece = self.pieces[token] if token < len(self.pieces) else b""
        self.emit(Tokens(job.job_id, [token], [piece], None if logprob is None else [logprob]))
        if seq.matcher is not None and self._grammar_ended(seq, token):
            return
        if len(seq.generated) >= seq.budget:  # the last token is not evaluated (as backends.engine)
            self._retire(seq, Finished(job.job_id, FinishReason.LENGTH, len(seq.generated)))

    def _grammar_ended(self, seq: Seq, token: int) -> bool:
        """Advance a constrained sequence's matcher; retire it when its grammar is complete or broken."""
        matcher, job_id = seq.matcher, seq.job.job_id
        matcher.accept(token)
        if matcher.error:
            self._retire(seq, Failed(job_id, ErrorKind.INTERNAL, f"constrained decoding failed: {matcher.error}"))
            return True
        if matcher.done:  # nothing but EOS may follow: stop as if the model had ended it
            self._retire(seq, Finished(job_id, FinishReason.STOP, len(seq.generated)))
            return True
        return False

    def _retire(self, seq: Seq, event: object) -> None:
        """End a sequence: free its slot at once, drop it from every queue, emit its last event."""
        if seq.state == WAITING:
            self.waiting.remove(seq)
        elif seq.state == PREFILL:
            self.prefilling.remove(seq)
        if seq.slot is not None and self.slots[seq.slot].seq is seq:
            self.slots[seq.slot].seq = None
            self.slots[seq.slot].last_used = self._use()
        seq.state = DONE
        self.sequences.pop(seq.job.job_id, None)
        self.emit(event)
