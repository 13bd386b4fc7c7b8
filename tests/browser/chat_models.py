"""The browser tests' models: GGML GPT-J "successor" files whose greedy reply is known, written at test time.

- `coder` always answers with CODER_REPLY (a short answer with a fenced code block), then ends.
- `long` repeats LONG_WORDS forever (never EOS): a reply that streams until max_tokens or Stop; it is
  wide and deep enough that a long reply lasts seconds, so the page can be seen streaming and stopped.
"""

from __future__ import annotations

import re
from pathlib import Path

EOS = b"<|endoftext|>"
CODER_REPLY = (
    "Sure! Here is a Python function that returns the n-th Fibonacci number:\n\n"
    "```python\n"
    "def fibonacci(n: int) -> int:\n"
    "    a, b = 0, 1\n"
    "    for _ in range(n):\n"
    "        a, b = b, a + b\n"
    "    return a\n"
    "```\n\n"
    "It runs in `O(n)` time and constant memory: `fibonacci(10)` returns 55."
)
LONG_WORDS = " The quick brown fox jumps over the lazy dog while the model keeps talking."


def unique_pieces(text: str) -> list[bytes]:
    """Split text into word pieces (leading whitespace kept), each piece unique and longer than one byte
    (single bytes stay outside the reply chain, so any prompt's last token starts the reply)."""
    pieces: list[str] = []
    for word in re.findall(r"\s*\S+|\s+$", text):
        if pieces and (word in pieces or len(word.encode()) < 2 or pieces[-1] in pieces[:-1]):
            pieces[-1] += word
        else:
            pieces.append(word)
    while len(pieces) > 1 and (pieces[-1] in pieces[:-1] or len(pieces[-1].encode()) < 2):
        pieces[-2] += pieces.pop()
    assert len(set(pieces)) == len(pieces) and "".join(pieces) == text, pieces
    return [p.encode() for p in pieces]


def _chain_model(path: Path, words: list[bytes], loop: bool, n_ctx: int, n_embd: int, n_layer: int) -> Path:
    """A model whose reply to any prompt is `words` in order: then EOS, or (loop) the words again."""
    from backends.ggml.writer import GPTJConfig, write_model

    vocab = [bytes([b]) for b in range(256)] + [EOS] + words
    eos, first, last = 256, 257, len(vocab) - 1
    vocab += [f"<unused{i}>".encode() for i in range(320 - len(vocab))]
    successor = [first] * len(vocab)
    for i in range(first, last):
        successor[i] = i + 1
    successor[last] = first if loop else eos
    config = GPTJConfig(n_vocab=len(vocab), n_ctx=n_ctx, n_embd=n_embd, n_head=4, n_layer=n_layer, n_rot=16,
                        ftype="q4_0")
    write_model(path, config, vocab=vocab, seed=12, kind="successor", successor=successor)
    return path


def write_coder(path: Path) -> Path:
    """The model that answers CODER_REPLY (2,048-token context)."""
    return _chain_model(path, unique_pieces(CODER_REPLY), loop=False, n_ctx=2048, n_embd=128, n_layer=2)


def write_long(path: Path) -> Path:
    """The model that talks until it is stopped (2,048-token context, slow enough to watch)."""
    return _chain_model(path, unique_pieces(LONG_WORDS), loop=True, n_ctx=2048, n_embd=768, n_layer=24)
