"""The bundled demo model: a tiny GPT-J the server writes itself, so the first start serves at once."""

from __future__ import annotations

from pathlib import Path

DEMO_REPLY = (
    " Hello! I am the demo model of gpt4all-j-server: a tiny GPT-J written by this server itself,"
    " so you can try its API right away. For useful answers, download GPT4All-J with:"
    " gpt4all-j-server pull gpt4all-j"
)
EOS = b"<|endoftext|>"


def demo_vocab() -> tuple[list[bytes], list[int]]:
    """Vocabulary (all bytes, EOS, the reply's words) and the successor map that spells the reply."""
    words = [(" " + w).encode() for w in DEMO_REPLY.split(" ")[1:]]
    assert len(set(words)) == len(words), "demo reply words must be unique tokens"
    vocab = [bytes([b]) for b in range(256)] + [EOS] + words
    eos, first, last = 256, 257, len(vocab) - 1
    vocab += [f"<unused{i}>".encode() for i in range(320 - len(vocab))]
    successor = [first] * len(vocab)  # after any prompt, the reply starts
    for i in range(first, last):
        successor[i] = i + 1
    successor[last] = eos
    return vocab, successor


def write_demo_model(path: str | Path, ftype: str = "q4_0") -> None:
    """Write the demo model (GGML GPT-J, 2048-token context) to path."""
    from backends.ggml.writer import GPTJConfig, write_model

    vocab, successor = demo_vocab()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    config = GPTJConfig(n_vocab=len(vocab), n_ctx=2048, n_embd=128, n_head=4, n_layer=2, n_rot=16,
                        ftype=ftype)
    write_model(path, config, vocab=vocab, seed=2023, kind="successor", successor=successor)
