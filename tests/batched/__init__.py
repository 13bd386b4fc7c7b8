"""Tests of the batched ggml GPT-J engine (backends/batched); skipped without ggml-python."""

import importlib.util

import pytest


def require_ggml() -> None:
    """Skip the calling test module when ggml-python is missing, without importing it.

    `pytest.importorskip("ggml")` would import ggml-python with its symbols global, which breaks
    ctransformers in the same pytest process; backends.batched imports it safely.
    """
    if importlib.util.find_spec("ggml") is None:
        pytest.skip("ggml-python is not installed (pip install ggml-python==0.0.45)", allow_module_level=True)
