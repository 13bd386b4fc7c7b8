"""Batched GPT-J on modern ggml (ggml-python 0.0.45): one copy of the weights, many sequences per step.

The engine is imported lazily, so the pure parts (scheduler, sampling) work without ggml-python.
"""

__all__ = ["BatchedEngine", "EngineConfig", "memory_needed"]


def __getattr__(name: str):
    """Load the ggml-backed engine on first use of one of its names."""
    if name in __all__:
        from backends.batched import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'backends.batched' has no attribute {name!r}")
