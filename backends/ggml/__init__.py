"""GGML GPT-J files: constants, quantizers, writer and reader/validator (no HTTP code here)."""

from .quants import bytes_per_row, dequantize, dequantize_legacy, quantize, quantize_legacy
from .reader import (
    LegacyModelFileError,
    ModelFileError,
    ModelInfo,
    TensorInfo,
    inspect_model,
    list_tensors,
    read_hparams,
    read_tensors,
    read_vocab,
)
from .writer import GPTJConfig, default_vocab, write_model

__all__ = [
    "GPTJConfig",
    "LegacyModelFileError",
    "ModelFileError",
    "ModelInfo",
    "TensorInfo",
    "bytes_per_row",
    "default_vocab",
    "dequantize",
    "dequantize_legacy",
    "inspect_model",
    "list_tensors",
    "quantize",
    "quantize_legacy",
    "read_hparams",
    "read_tensors",
    "read_vocab",
    "write_model",
]
