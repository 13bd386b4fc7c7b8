"""Grammar-constrained decoding with llguidance: constraints built in the server, token masks in the engines.

A `Constraint` is an llguidance grammar (a JSON string), small and picklable, built and validated in the
server process (`json_object`, `json_schema`, `lark`, then `check` against the model's vocabulary). An
engine process builds one `Vocab` from the model's token pieces (an LLTokenizer plus an LRU cache of
compiled grammars) and one `Matcher` per constrained sequence: `allowed()` is the mask of tokens the
grammar permits next (EOS only when the grammar may end), `accept(token)` advances it, `done` means the
grammar is complete and the sequence must stop. JSON is generated compact (no free whitespace), so a model
cannot pad an object with blanks until max_tokens.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: "," and ":" with no blanks around them
CACHE_SIZE = 64  # compiled grammars kept per vocabulary
MAX_MESSAGE = 300  # characters of an llguidance message kept (its full text embeds the parser state and grammar)
CHECK_STEPS = 64  # forced tokens `check` follows, computing each mask as an engine will
_vocabs: OrderedDict[tuple[int, int], tuple[Sequence[bytes], Vocab]] = OrderedDict()
_lock = threading.Lock()


@dataclass(frozen=True)
class Constraint:
    """An llguidance grammar (JSON string) the generated tokens must match."""

    grammar: str


class GrammarError(ValueError):
    """A grammar or schema llguidance cannot compile; the message names what is wrong or unsupported."""

    def __init__(self, message: str) -> None:
        super().__init__(short(message))


def short(message: str) -> str:
    """An llguidance message cut to its first line and MAX_MESSAGE characters (never the state dump)."""
    line = message.strip().split("\n", 1)[0].strip()
    return line if len(line) <= MAX_MESSAGE else line[:MAX_MESSAGE - 3] + "..."


def _validated(grammar: str) -> Constraint:
    """A Constraint after llguidance's vocabulary-free validation (GrammarError when invalid)."""
    from llguidance import LLMatcher

    message = LLMatcher.validate_grammar(grammar)
    if message:
        raise GrammarError(message)
    return Constraint(grammar)


def json_object() -> Constraint:
    """Any JSON object."""
    return json_schema({"type": "object"})


def json_schema(schema: dict) -> Constraint:
    """JSON valid against a JSON Schema; GrammarError when llguidance cannot compile the schema."""
    from llguidance import LLMatcher

    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise GrammarError(str(exc)) from None
    return _validated(grammar)


def lark(text: str) -> Constraint:
    """Text matching a Lark grammar in llguidance's syntax; GrammarError when it does not compile."""
    from llguidance import LLMatcher

    return _validated(LLMatcher.grammar_from_lark(text))


class _Pieces:
    """The adapter llguidance's TokenizerWrapper reads: token bytes, EOS and a tokenize callable."""

    def __init__(self, pieces: Sequence[bytes], eos: int) -> None:
        from backends.tokenizer import Tokenizer

        self.eos_token_id, self.bos_token_id = eos, None
        self.special_token_ids = [i for i, p in enumerate(pieces) if i == eos or _special(p)]
        special = set(self.special_token_ids)
        # llguidance marks special tokens with a leading 0xFF byte: they never match grammar text
        self.tokens = [b"\xff" + p if i in special else bytes(p) for i, p in enumerate(pieces)]
        self._tokenizer = Tokenizer(list(pieces))

    def __call__(self, text: str | bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


def _special(piece: bytes) -> bool:
    """Control-looking pieces such as <|endoftext|> or <|extra_7|> are not text a grammar may produce."""
    return piece.startswith(b"<|") and piece.endswith(b"|>") and len(piece) > 4


class Vocab:
    """A model's vocabulary for llguidance plus its LRU cache of compiled grammars (one per process)."""

    def __init__(self, pieces: Sequence[bytes], eos: int, cache_size: int = CACHE_SIZE) -> None:
        from llguidance import LLTokenizer, TokenizerWrapper

        self.n_vocab, self.eos = len(pieces), eos
        self.tokenizer = LLTokenizer(TokenizerWrapper(_Pieces(pieces, eos)), n_vocab=len(pieces))
        self.cache_size = cache_size
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self.hits = self.misses = 0
        self._lock = threading.Lock()  # the server may check grammars from several threads

    def compiled(self, grammar: str):
        """A fresh LLMatcher for a grammar: a copy of the cached compiled one (GrammarError if it fails)."""
        from llguidance import LLMatcher

        with self._lock:
            proto = self._compiled.get(grammar)
            if proto is not None:
                self._compiled.move_to_end(grammar)
                self.hits += 1
                return proto.deep_copy()
            self.misses += 1
        proto = LLMatcher(self.tokenizer, grammar, log_level=0)  # outside the lock: compiling drops the GIL
        if proto.is_error():
            raise GrammarError(proto.get_error())
        with self._lock:
            self._compiled[grammar] = proto
            if len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return proto.deep_copy()


def vocab_for(pieces: Sequence[bytes], eos: int) -> Vocab:
    """The process's Vocab for these pieces (built once per pieces object and EOS, then reused)."""
    key = (id(pieces), eos)
    with _lock:
        entry = _vocabs.get(key)
        if entry is not None and entry[0] is pieces:
            _vocabs.move_to_end(key)
            return entry[1]
        vocab = Vocab(pieces, eos)
        _vocabs[key] = (pieces, vocab)  # holding the pieces keeps their id from being reused
        if len(_vocabs) > 4:
            _vocabs.popitem(last=False)
        return vocab


def check(constraint: Constraint, tokenizer_pieces: Sequence[bytes], eos: int) -> None:
    """Compile a constraint against a model's vocabulary and compute its first masks as an engine will
    (through the tokens the grammar forces); GrammarError if it cannot be used."""
    matcher = Matcher(constraint, vocab_for(tokenizer_pieces, eos))
    for _ in range(CHECK_STEPS):
        allowed = matcher.allowed()
        if matcher.error:
            raise GrammarError(matcher.error)
        if not allowed.any():
            raise GrammarError("the grammar allows no token")
        forced = matcher.forced()
        if not forced:
            return
        for token in forced:
            matcher.accept(token)


class Matcher:
    """One sequence's position in its grammar: the allowed-token mask, token by token."""

    def __init__(self, constraint: Constraint, vocab: Vocab) -> None:
        self.vocab = vocab
        self._m = vocab.compiled(constraint.grammar)
        self._bits = np.zeros((vocab.n_vocab + 31) // 32, dtype=np.uint32)

    def allowed(self) -> np.ndarray:
        """Bool mask [n_vocab] of the tokens the grammar allows now (EOS only when it may end)."""
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        return bits[: self.vocab.n_vocab].view(bool)

    def mask(self, logits: np.ndarray) -> int:
        """Set the disallowed logits to -inf in place; returns how many tokens remain allowed."""
        allowed = self.allowed()
        logits[~allowed] = -np.inf
        return int(np.count_nonzero(allowed))

    def accept(self, token: int) -> None:
        """Advance past a sampled token (a token the grammar refuses puts the matcher in error)."""
        self._m.consume_token(int(token))

    def forced(self) -> list[int]:
        """The tokens the grammar forces next (empty when it leaves a choice)."""
        return list(self._m.compute_ff_tokens())

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but EOS may follow, the sequence must stop."""
        return self._m.is_stopped() and not self._m.is_error()

    @property
    def error(self) -> str | None:
        """Why the matcher failed, or None."""
        return short(self._m.get_error() or "the grammar matcher failed") if self._m.is_error() else None


def grammar_failure(matcher: Matcher) -> str:
    """The message of a sequence ended because its grammar broke (an error, or no token left to sample)."""
    return f"constrained decoding failed: {matcher.error or 'the grammar allows no token here'}"
