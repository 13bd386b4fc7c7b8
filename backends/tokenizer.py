"""GGML's GPT tokenizer (the one ctransformers' GPT-J uses), in Python, over the file's vocabulary.

The engine splits text into words with GPT-2's pattern using ASCII character classes on raw bytes,
then covers each word with the longest vocabulary entries, left to right (bytes with no entry are
dropped). The server uses this to count tokens and check the context before a request is queued;
tests prove it gives the engine's ids.

The longest match at a position is found by growing the candidate one byte at a time while it is
still a prefix of some vocabulary entry, so the work per token is about the token's length (the
engine tries every length from the end of the word down, which is quadratic in the word's length).
"""

from __future__ import annotations

import re

_WORDS = re.compile(
    rb"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\s A-Za-z0-9]+|\s+(?!\S)|\s+"
)


class Tokenizer:
    """Greedy longest-match tokenizer over a GGML vocabulary."""

    def __init__(self, vocab: list[bytes]) -> None:
        self.pieces = vocab
        self.ids: dict[bytes, int] = {}
        for i, piece in enumerate(vocab):
            self.ids[piece] = i  # like the engine's map: a repeated piece keeps the last id
        self.longest = max((len(p) for p in vocab), default=1)
        # every proper prefix of a piece: a candidate that is not one cannot grow into a longer match
        self._grows = frozenset(p[:k] for p in self.ids for k in range(1, len(p)))
        # with a token for every single byte no byte is dropped, so a token covers at most `longest` bytes
        self.covers_every_byte = all(bytes([b]) in self.ids for b in range(256))

    def max_bytes(self, tokens: int) -> int | None:
        """The most UTF-8 bytes a text of `tokens` tokens can have (None: no bound, bytes may be dropped)."""
        return max(tokens, 0) * self.longest if self.covers_every_byte else None

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of text; with a limit, stops once more than `limit` ids are found (a prefix of them)."""
        out: list[int] = []
        for word in _WORDS.findall(text.encode("utf-8")):
            self._cover(word, out, limit)
            if limit is not None and len(out) > limit:
                break
        return out

    def _cover(self, word: bytes, out: list[int], limit: int | None) -> None:
        ids, n = self.ids, len(word)
        if n <= self.longest:  # most words are one token
            token = ids.get(word)
            if token is not None:
                out.append(token)
                return
        grows, i = self._grows, 0
        while i < n:
            end, j = 0, i + 1
            while j <= n:
                candidate = word[i:j]
                if candidate in ids:
                    end = j
                if candidate not in grows:
                    break
                j += 1
            if end:
                out.append(ids[word[i:end]])
                i = end
                if limit is not None and len(out) > limit:
                    return
            else:
                i += 1  # the engine skips a byte it has no token for

    def decode(self, ids: list[int]) -> bytes:
        """Raw bytes of token ids (ids outside the vocabulary give nothing)."""
        pieces = self.pieces
        return b"".join(pieces[i] for i in ids if 0 <= i < len(pieces))
