"""Review fixes of /v1/embeddings' pure logic: a lone surrogate is a 400, and a large body is rendered off the
event loop, a vector at a time, byte for byte as JSONBody would write it."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from server import embeddings
from server.embeddings import BIG_BODY, body_bytes, input_tokens, render, tokens_of
from server.errors import APIError, JSONBody
from server.protocol.embeddings import EmbeddingRequest, embedding_list
from tests.unit.test_embeddings import model


@pytest.mark.parametrize("value,name", [("a\ud800b", "input"), (["ok", "\udfff"], "input[1]")])
def test_a_lone_surrogate_is_a_400_naming_the_input(value, name):
    with pytest.raises(APIError) as exc:
        input_tokens(value, model(), 10)
    e = exc.value
    assert (e.status, e.param, e.code) == (400, "input", "invalid_unicode")
    assert e.message.startswith(f"{name} is not valid Unicode")


def _vectors(n: int, dims: int) -> list[bytes]:
    rng = np.random.default_rng(n)
    return [rng.standard_normal(dims).astype("<f4").tobytes() for _ in range(n)]


@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize("name", ["m", "modèle-\u65e5"])
def test_render_writes_exactly_what_jsonbody_writes(encoding, name):
    body = embedding_list(name, _vectors(5, 7), encoding, 12)
    assert render(body) == JSONBody(body).body


def test_a_large_body_is_rendered_in_another_thread(monkeypatch):
    threads = []

    def spy(body):
        threads.append(threading.get_ident())
        return render(body)

    monkeypatch.setattr(embeddings, "render", spy)
    dims = 64
    small = embedding_list("m", _vectors(2, dims), "float", 2)
    big = embedding_list("m", _vectors(BIG_BODY // dims + 1, dims), "float", 2)

    async def main() -> tuple[bytes, bytes, int]:
        return await body_bytes(small), await body_bytes(big), threading.get_ident()

    got_small, got_big, loop_thread = asyncio.run(main())
    assert got_small == JSONBody(small).body and got_big == JSONBody(big).body
    assert threads[0] == loop_thread  # a small body: no thread hop
    assert threads[1] != loop_thread  # a large one: the event loop is free meanwhile


def test_an_input_longer_than_the_context_is_refused_by_its_length_first():
    with pytest.raises(APIError) as exc:  # 9 ids past the vocabulary: the length alone decides, as for prompts
        input_tokens([[1], [10**9] * 9], model(), 10)
    assert (exc.value.param, exc.value.code) == ("input", "context_length_exceeded")
    assert "input[1] has 9 tokens" in exc.value.message


def test_many_token_ids_are_checked_in_another_thread(monkeypatch):
    threads = []

    def spy(*args):
        threads.append(threading.get_ident())
        return input_tokens(*args)

    monkeypatch.setattr(embeddings, "input_tokens", spy)
    lists = [[1] * 8 for _ in range(embeddings.BIG_INPUT // 8)]  # few lists, many ids
    req = EmbeddingRequest(model="m", input=lists)

    async def main() -> int:
        assert len(await tokens_of(req, model(), len(lists))) == len(lists)
        assert len(await tokens_of(EmbeddingRequest(model="m", input=[[1], [2]]), model(), 10)) == 2
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert threads[0] != loop_thread and threads[1] == loop_thread
