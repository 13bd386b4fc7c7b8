"""POST /v1/embeddings as a hostile client, through the real server: a lone surrogate, a client that leaves
(only what was read is counted), generation unchanged while embeddings flood in, a big float body."""

from __future__ import annotations

import base64
import re
import threading

import httpx
import numpy as np
import pytest

from tests.batched import require_ggml
from tests.e2e.conftest import serve_registry, wait_for
from tests.models import NO_EOS, write_random
from tests.schemas import validate

require_ggml()

REGISTRY = """
models:
  - id: small
    path: {small}
    prompt_template: plain
    engine: ggml
    parallel: 2
    max_queue: 2
    sampling: {{temperature: 0}}
  - id: slow  # enough work per input that a request is still being read when its client leaves
    path: {slow}
    prompt_template: plain
    engine: ggml
    parallel: 2
"""
N_EMBD = 64


@pytest.fixture(scope="module")
def review_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("emb-review-models")
    files = {"small": write_random(d / "small.bin", n_ctx=256, n_embd=N_EMBD),
             "slow": write_random(d / "slow.bin", n_ctx=512, n_embd=256, n_layer=6, seed=3)}
    yield from serve_registry(REGISTRY.format(**{k: str(v) for k, v in files.items()}),
                              tmp_path_factory.mktemp("emb-review-server"),
                              {"GPT4ALL_J_MAX_EMBEDDING_INPUTS": "2048"})


@pytest.fixture()
def api(review_server):
    with httpx.Client(base_url=review_server.url, timeout=60) as c:
        yield c


def ids(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 512, n)]


@pytest.mark.parametrize("raw,name", [(b'"a\\ud800b"', "input"), (b'["ok", "\\udfff"]', "input[1]")])
def test_a_lone_surrogate_is_a_400_not_a_500(api, raw, name):
    r = api.post("/embeddings", content=b'{"model": "small", "input": ' + raw + b"}",
                 headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    validate("error", r.json())
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("input", "invalid_unicode") and err["message"].startswith(name)
    assert api.post("/embeddings", json={"model": "small", "input": "still fine"}).status_code == 200


def _access_line(server, request_id: str) -> str | None:
    return next((line for line in server.logs().splitlines()
                 if "gpt4all_j_server.access" in line and request_id in line), None)


def test_a_request_cut_short_counts_only_the_tokens_read(review_server):
    inputs = [ids(i, 500) for i in range(30)]  # 15,000 tokens: seconds of work for this model
    try:
        httpx.post(review_server.url + "/embeddings", json={"model": "slow", "input": inputs}, timeout=0.3,
                   headers={"X-Request-ID": "emb-review-gone"})
    except httpx.TimeoutException:
        pass
    assert wait_for(lambda: _access_line(review_server, "emb-review-gone") is not None, 30)
    line = _access_line(review_server, "emb-review-gone")
    assert "outcome=client_gone" in line
    counted = int(re.search(r"prompt_tokens=(\d+)", line).group(1))
    assert counted % 500 == 0 and counted < 30 * 500, line  # whole inputs read, not the whole request


def test_a_finished_request_counts_every_token(api, review_server):
    r = api.post("/embeddings", json={"model": "small", "input": [ids(1, 7), ids(2, 5)]},
                 headers={"X-Request-ID": "emb-review-done"})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 12
    assert wait_for(lambda: _access_line(review_server, "emb-review-done") is not None, 30)
    assert "prompt_tokens=12 " in _access_line(review_server, "emb-review-done")


def test_a_generation_is_unchanged_while_embeddings_flood_in(api, review_server):
    gen = {"model": "small", "prompt": "hello there", "max_tokens": 60, "temperature": 0, **NO_EOS}
    alone = api.post("/completions", json=gen).json()["choices"][0]["text"]
    answers: dict = {}

    def flood(k: int) -> None:
        body = {"model": "small", "input": [ids(100 * k + i, 150) for i in range(12)]}
        answers[k] = httpx.post(review_server.url + "/embeddings", json=body, timeout=60)

    def generate() -> None:
        answers["gen"] = httpx.post(review_server.url + "/completions", json=gen, timeout=60)

    threads = [threading.Thread(target=generate)] + [threading.Thread(target=flood, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert answers["gen"].status_code == 200 and answers["gen"].json()["choices"][0]["text"] == alone
    for k in range(4):  # a full queue is a proper 503; nothing else
        r = answers[k]
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            validate("error", r.json())
            assert r.json()["error"]["code"] == "queue_full" and r.headers["Retry-After"]
    ready = httpx.get(review_server.base + "/ready", timeout=5).json()["models"]["small"]
    assert ready["busy"] == 0 and ready["queued"] == 0  # no slot kept


def test_a_body_large_enough_to_be_rendered_in_a_thread_is_the_same_json(api):
    inputs = [[i % 500 + 1] for i in range(1100)]  # 1100 x 64 floats: past BIG_BODY
    floats = api.post("/embeddings", json={"model": "small", "input": inputs})
    b64 = api.post("/embeddings", json={"model": "small", "input": inputs, "encoding_format": "base64"})
    assert floats.status_code == b64.status_code == 200
    assert floats.headers["content-type"] == "application/json"
    body = floats.json()
    validate("embedding_response", body)
    got = np.asarray([d["embedding"] for d in body["data"]], np.float32)
    want = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b64.json()["data"]])
    assert got.shape == (1100, N_EMBD)
    assert np.max(np.abs(got - want)) <= 1e-4  # two requests may pack inputs into steps differently


def test_a_shutdown_cuts_a_long_embedding_request_with_a_503(tmp_path):
    """SIGTERM while a request's inputs are being read: after the grace, a proper 503 and the server exits."""
    model = write_random(tmp_path / "slow.bin", n_ctx=512, n_embd=256, n_layer=6, seed=3)
    registry = f"models:\n  - id: small\n    path: {model}\n    prompt_template: plain\n    engine: ggml\n"
    gen = serve_registry(registry, tmp_path, {"GPT4ALL_J_SHUTDOWN_GRACE": "1"})
    server = next(gen)
    answer: dict = {}
    body = {"model": "small", "input": [ids(i, 500) for i in range(200)]}  # far more than a second of work
    sender = threading.Thread(target=lambda: answer.update(r=httpx.post(server.url + "/embeddings", json=body,
                                                                         timeout=60)))
    sender.start()
    try:
        assert wait_for(lambda: httpx.get(server.base + "/ready", timeout=5).json()["models"]["small"]["busy"] > 0,
                        30)
        server.proc.terminate()
        sender.join(60)
        r = answer["r"]
        assert r.status_code == 503, r.text
        validate("error", r.json())
        assert r.json()["error"]["code"] == "server_shutting_down" and r.headers["Retry-After"]
        assert server.proc.wait(30) == 0
        assert "outcome=cut:shutdown" in server.logs()
    finally:
        gen.close()
