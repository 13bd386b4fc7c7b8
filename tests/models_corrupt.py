"""Model files whose weights hold NaN but whose structure is valid: they pass the inspector."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backends.ggml.reader import list_tensors
from tests.models import write_random


def write_nan_model(path: Path, token: int | None = None, n_ctx: int = 128) -> Path:
    """A random f32 model with NaN weights.

    token None: every weight of transformer.ln_f.bias is NaN, so every logit is NaN at once;
    else only the embedding row of `token` is NaN, so the logits turn NaN once it is evaluated.
    """
    write_random(path, ftype="f32", n_ctx=n_ctx)
    tensors = {t.name: t for t in list_tensors(path)}
    with open(path, "r+b") as f:
        if token is None:
            t = tensors["transformer.ln_f.bias"]
            f.seek(t.offset)
            f.write(np.full(t.n_elements, np.nan, dtype="<f4").tobytes())
        else:
            t = tensors["transformer.wte.weight"]
            n_embd = t.shape[-1]
            f.seek(t.offset + token * n_embd * 4)
            f.write(np.full(n_embd, np.nan, dtype="<f4").tobytes())
    return path
