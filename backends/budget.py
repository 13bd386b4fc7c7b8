"""How many tokens a generation may produce: one check shared by every engine."""

from __future__ import annotations


class ContextOverflow(Exception):
    """The prompt plus max_tokens does not fit the model's context."""


def generation_budget(prompt: list[int], max_tokens: int | None, n_ctx: int, n_vocab: int | None = None) -> int:
    """Tokens a job may generate; ValueError for a bad prompt, ContextOverflow when it cannot fit."""
    if not prompt:
        raise ValueError("the prompt is empty after tokenization")
    if n_vocab is not None:
        bad = [t for t in prompt if not 0 <= t < n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")
    room = n_ctx - len(prompt)
    want = max_tokens if max_tokens is not None else room
    if want > room or room <= 0:
        raise ContextOverflow(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{len(prompt) + want} tokens ({len(prompt)} in the prompt, {want} for the completion). "
            "Please reduce the prompt or the completion length."
        )
    return want
