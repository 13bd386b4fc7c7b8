"""How many tokens a generation may produce, and whether an embedding input fits: checks shared by every engine."""

from __future__ import annotations


class ContextOverflow(Exception):
    """The prompt plus max_tokens does not fit the model's context."""


def check_ids(ids: list[int], n_vocab: int | None, what: str) -> None:
    """ValueError if there are no token ids or one is outside the vocabulary (`what` names them)."""
    if not ids:
        raise ValueError(f"the {what} is empty after tokenization")
    if n_vocab is not None:
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})")


def generation_budget(prompt: list[int], max_tokens: int | None, n_ctx: int, n_vocab: int | None = None) -> int:
    """Tokens a job may generate; ValueError for a bad prompt, ContextOverflow when it cannot fit."""
    check_ids(prompt, n_vocab, "prompt")
    room = n_ctx - len(prompt)
    want = max_tokens if max_tokens is not None else room
    if want > room or room <= 0:
        raise ContextOverflow(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{len(prompt) + want} tokens ({len(prompt)} in the prompt, {want} for the completion). "
            "Please reduce the prompt or the completion length."
        )
    return want


def embedding_fits(prompt: list[int], n_ctx: int, n_vocab: int | None = None) -> None:
    """Check an embedding input: ValueError if it is empty or has an id outside the vocabulary,
    ContextOverflow if it is longer than the context (it is read, nothing is generated)."""
    if len(prompt) > n_ctx:  # first: the length alone decides, whatever 50,000 ids hold
        raise ContextOverflow(f"This model's maximum context length is {n_ctx} tokens, however you requested "
                              f"{len(prompt)} tokens in the input. Please reduce the input.")
    check_ids(prompt, n_vocab, "input")
