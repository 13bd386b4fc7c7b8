"""POST /v1/embeddings: the request body and the response (OpenAI's wire format)."""

from __future__ import annotations

import base64
from typing import Literal

from pydantic import Field

from server.protocol.requests import Prompt, _Request
from server.protocol.responses import _Response


class EmbeddingRequest(_Request):
    """OpenAI's CreateEmbeddingRequest."""

    input: Prompt = Field(description="Text, a list of texts, a list of token ids or a list of token-id lists.")
    model: str = Field(description="Model id or alias from the registry (engine ggml).")
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="float: lists of numbers; base64: each vector as little-endian float32 bytes.")
    dimensions: int | None = Field(None, ge=1, description="Must equal the model's n_embd (vectors are not cut).")
    user: str | None = None


class EmbeddingObject(_Response):
    """One input's vector."""

    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # str: base64 of little-endian float32
    index: int


class EmbeddingUsage(_Response):
    """Token counts of an embedding request (inputs as the model's tokenizer splits them)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Response):
    """OpenAI's CreateEmbeddingResponse."""

    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: EmbeddingUsage


def embedding_list(model: str, vectors: list[bytes], encoding_format: str, prompt_tokens: int) -> dict:
    """The response body, as EmbeddingList; vectors are little-endian float32 bytes (built directly: a pydantic
    model of thousands of 4096-float lists would cost seconds)."""
    import numpy as np

    data = []
    for index, raw in enumerate(vectors):
        if encoding_format == "base64":
            value: list[float] | str = base64.b64encode(raw).decode("ascii")
        else:
            value = np.frombuffer(raw, dtype="<f4").tolist()
        data.append({"object": "embedding", "embedding": value, "index": index})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
