"""GGML's GPT tokenizer (the one ctransformers' GPT-J uses), in Python, over the file's vocabulary.

The engine splits text into words with GPT-2's pattern using ASCII character classes on raw bytes,
then covers each word with the longest vocabulary entries, left to right (bytes with no entry are
dropped). The server uses this to count tokens and check the context before a request is queued;
tests prove it gives the engine's ids.
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

    def encode(self, text: str) -> list[int]:
        """Token ids of text."""
        out: list[int] = []
        for word in _WORDS.findall(text.encode("utf-8")):
            self._cover(word, out)
        return out

    def _cover(self, word: bytes, out: list[int]) -> None:
        ids, n, i = self.ids, len(word), 0
        if n <= self.longest:  # most words are one token
            token = ids.get(word)
            if token is not None:
                out.append(token)
                return
        while i < n:
            for j in range(min(n, i + self.longest), i, -1):
                token = ids.get(word[i:j])
                if token is not None:
                    out.append(token)
                    i = j
                    break
            else:
                i += 1  # the engine skips a byte it has no token for

    def decode(self, ids: list[int]) -> bytes:
        """Raw bytes of token ids (ids outside the vocabulary give nothing)."""
        pieces = self.pieces
        return b"".join(pieces[i] for i in ids if 0 <= i < len(pieces))
