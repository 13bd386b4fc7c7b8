"""Batched GPT-J on modern ggml (ggml-python 0.0.45): one copy of the weights, many sequences per step."""

from .engine import BatchedEngine, EngineConfig, memory_needed

__all__ = ["BatchedEngine", "EngineConfig", "memory_needed"]
