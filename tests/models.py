"""Test models: tiny GGML GPT-J files written by the project's own writer (never committed)."""

from __future__ import annotations

from pathlib import Path

EOS = b"<|endoftext|>"
RANDOM_EOS_ID = 292  # <|endoftext|> in default_vocab (write_random's vocabulary)
NO_EOS = {"logit_bias": {str(RANDOM_EOS_ID): -100}}  # request fields: never stop before max_tokens
EXTRA = [b"Hi", b" there", b" done", b" Hello", b" world"]


def successor_vocab() -> tuple[list[bytes], list[int]]:
    """A vocabulary and successor map whose greedy continuations are known exactly.

    - letters: a→b→…→z→EOS   (prompt "x" continues "yz", then stops)
    - digits:  0→1→…→9→é→日→" done"→EOS, the accented characters split into single-byte tokens
    - newline: "\\n"→"Hi"→" there"→"!"→EOS   (what a chat reply looks like)
    - every other token → EOS
    """
    vocab = [bytes([b]) for b in range(256)] + [EOS] + EXTRA
    vocab += [f"<unused{i}>".encode() for i in range(320 - len(vocab))]
    eos = 256
    idx = {tok: i for i, tok in enumerate(vocab)}
    succ = [eos] * len(vocab)
    letters = [idx[bytes([c])] for c in range(ord("a"), ord("z") + 1)]
    for a, b in zip(letters, letters[1:]):
        succ[a] = b
    chain = [idx[str(d).encode()] for d in range(10)]
    chain += [idx[bytes([b])] for b in "é日".encode()] + [idx[b" done"]]
    for a, b in zip(chain, chain[1:]):
        succ[a] = b
    reply = [idx[b"\n"], idx[b"Hi"], idx[b" there"], idx[b"!"]]
    for a, b in zip(reply, reply[1:]):
        succ[a] = b
    return vocab, succ


def write_successor(path: Path, ftype: str = "q8_0", n_ctx: int = 256) -> Path:
    """The successor test model."""
    from backends.ggml.writer import GPTJConfig, write_model

    vocab, succ = successor_vocab()
    config = GPTJConfig(n_vocab=len(vocab), n_ctx=n_ctx, n_embd=128, n_head=4, n_layer=1, n_rot=8,
                        ftype=ftype)
    write_model(path, config, vocab=vocab, seed=7, kind="successor", successor=succ)
    return path


def write_random(path: Path, ftype: str = "q4_0", n_ctx: int = 128, n_embd: int = 64,
                 n_layer: int = 2, seed: int = 1) -> Path:
    """A random-weight model (varied, non-degenerate output)."""
    from backends.ggml.writer import GPTJConfig, default_vocab, write_model

    config = GPTJConfig(n_vocab=512, n_ctx=n_ctx, n_embd=n_embd, n_head=4, n_layer=n_layer, n_rot=8,
                        ftype=ftype)
    write_model(path, config, vocab=default_vocab(512), seed=seed, kind="random")
    return path


def load_engine(path: Path):
    """The file loaded by ctransformers' low-level LLM (1 thread, this CPU's library)."""
    from ctransformers import llm

    from backends.engine import cpu_library

    return llm.LLM(str(path), "gptj", config=llm.Config(threads=1), lib=cpu_library())


def ctransformers_logits(path: Path, tokens: list[int], prompt_len: int, n_vocab: int) -> list:
    """ctransformers' logits after the first prompt_len tokens and after the rest (the reference the batched
    engine's prefill and decode are compared with)."""
    llm = load_engine(path)
    try:
        llm.eval(tokens[:prompt_len])
        first = engine_logits(llm, n_vocab)
        llm.eval(tokens[prompt_len:])
        return [first, engine_logits(llm, n_vocab)]
    finally:
        del llm


def engine_logits(engine, n_vocab: int):
    """A copy of the engine's logits for the last evaluated token."""
    import ctypes

    import numpy as np

    size = engine.ctransformers_llm_logits_size()
    ptr = ctypes.cast(engine.ctransformers_llm_logits_data(), ctypes.POINTER(ctypes.c_float))
    return np.ctypeslib.as_array(ptr, shape=(size,))[size - n_vocab:].copy()


def wrong_successors(engine, contexts, successor: list[int], n_vocab: int) -> list[tuple[int, int, int]]:
    """(token, greedy next, expected) for each context token whose greedy next is not its successor."""
    import numpy as np

    wrong = []
    for t in contexts:
        engine.eval([int(t)])
        got = int(np.argmax(engine_logits(engine, n_vocab)))
        if got != successor[t]:
            wrong.append((int(t), got, successor[t]))
    return wrong
