"""POST /v1/embeddings through the real server: shapes, the numpy reference, errors, concurrency, clients.

A vector is the mean of an input's final hidden states (after ln_f), L2-normalised, computed by the batched
engine; the reference is tests/reference/gptj_numpy.pooled_embedding (clean float64 GPT-J).
`pytest -s` prints the figures.
"""

from __future__ import annotations

import base64
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from tests.batched import require_ggml
from tests.e2e.conftest import serve_registry, wait_for
from tests.models import write_random
from tests.schemas import validate

require_ggml()

from backends.ggml.reader import read_hparams, read_tensors, read_vocab  # noqa: E402
from backends.ggml.writer import GPTJConfig, default_vocab, write_model  # noqa: E402
from backends.tokenizer import Tokenizer  # noqa: E402
from tests.reference.gptj_numpy import pooled_embedding  # noqa: E402

MODEL = dict(n_vocab=512, n_ctx=128, n_embd=128, n_head=4, n_layer=2, n_rot=16)
N_EMBD, N_CTX = MODEL["n_embd"], MODEL["n_ctx"]
MAX_INPUTS = 40
# the same vector computed twice in different batches (other chunk splits, other neighbours): float32 rounding
SAME_MAX_ABS = 1e-4
# vs the clean float64 GPT-J: f32/f16 weights (rounding of the f16 KV cache and attention), quantized weights
EXACT_MAX_ABS, EXACT_MIN_COS = 5e-4, 0.99999
QUANT_MIN_COS = 0.999

REGISTRY = """
models:
  - id: e32
    path: {f32}
    prompt_template: plain
    engine: ggml
    parallel: 4
    max_queue: 8
  - id: e16
    path: {f16}
    prompt_template: plain
    engine: ggml
    parallel: 2
  - id: eq
    path: {q4_0}
    prompt_template: plain
    engine: ggml
    parallel: 2
  - id: ect
    path: {f32}
    prompt_template: plain
    engine: ctransformers
  - id: eslow  # enough work per input to kill its engine mid-request
    path: {slow}
    prompt_template: plain
    engine: ggml
    parallel: 4
"""
TEXTS = ["The quick brown fox", "jumps over the lazy dog", "Hello world", "a", "GPT-J reads this sentence too.",
         "Embeddings from the loaded model " * 4]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("emb-models")
    out = {}
    for ftype in ("f32", "f16", "q4_0"):
        out[ftype] = d / f"emb-{ftype}.bin"
        write_model(out[ftype], GPTJConfig(ftype=ftype, **MODEL), vocab=default_vocab(512), seed=1234, kind="random")
    out["slow"] = write_random(d / "emb-slow.bin", n_ctx=512, n_embd=512, n_layer=8, seed=3)
    return out


@pytest.fixture(scope="module")
def emb_server(files, tmp_path_factory):
    env = {"GPT4ALL_J_MAX_EMBEDDING_INPUTS": str(MAX_INPUTS)}
    yield from serve_registry(REGISTRY.format(**{k: str(v) for k, v in files.items()}),
                              tmp_path_factory.mktemp("emb-server"), env)


@pytest.fixture()
def api(emb_server):
    with httpx.Client(base_url=emb_server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(files) -> Tokenizer:
    return Tokenizer(read_vocab(files["f32"]))


def embed(api, input, model="e32", **extra) -> dict:
    body = {"model": model, "input": input, **extra}
    validate("embedding_request", body)
    r = api.post("/embeddings", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    if extra.get("encoding_format") != "base64":
        validate("embedding_response", out)
    return out


def vectors(body: dict) -> np.ndarray:
    """The response's vectors as a float32 array (either encoding), checking the data order."""
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") if isinstance(d["embedding"], str)
            else np.asarray(d["embedding"], np.float32) for d in body["data"]]
    return np.stack(rows)


def error(api, body: dict, status: int = 400) -> dict:
    r = api.post("/embeddings", json=body)
    assert r.status_code == status, r.text
    validate("error", r.json())
    return r.json()["error"]


def random_ids(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, MODEL["n_vocab"], n)]


# ---- the model card and the wire format ----

def test_the_model_card_says_how_embeddings_are_made(api):
    cards = {m["id"]: m for m in api.get("/models").json()["data"]}
    for name in ("e32", "e16", "eq"):
        validate("model", cards[name])
        assert cards[name]["embedding"] == {"dimensions": N_EMBD, "pooling": "mean", "normalized": True}
    assert cards["ect"]["embedding"] is None  # ctransformers cannot embed
    assert api.get("/models/e32").json()["embedding"]["dimensions"] == N_EMBD


def test_float_and_base64_give_the_same_unit_vectors_in_input_order(api, tokenizer):
    floats = embed(api, TEXTS)
    b64 = embed(api, TEXTS, encoding_format="base64", user="someone", dimensions=N_EMBD)
    assert floats["object"] == "list" and floats["model"] == "e32"
    assert all(isinstance(d["embedding"], str) for d in b64["data"])
    got, got64 = vectors(floats), vectors(b64)
    assert got.shape == (len(TEXTS), N_EMBD)
    # base64 = the same float32 values (two requests may pack the inputs into steps differently: rounding)
    assert np.max(np.abs(got - got64)) <= SAME_MAX_ABS
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    tokens = sum(len(tokenizer.encode(t)) for t in TEXTS)
    assert floats["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens} == b64["usage"]


def test_the_four_input_shapes_and_the_same_text_twice(api, tokenizer):
    text = TEXTS[0]
    ids = tokenizer.encode(text)
    one = vectors(embed(api, text))[0]
    assert np.array_equal(vectors(embed(api, text))[0], one)  # the same text again: the same vector
    for shape in ([text], ids, [ids], [text, text]):
        body = embed(api, shape)
        for row in vectors(body):
            assert np.max(np.abs(row - one)) <= SAME_MAX_ABS
        assert body["usage"]["prompt_tokens"] == len(ids) * len(body["data"])


def test_a_batch_equals_each_input_alone(api):
    inputs = [random_ids(i, n) for i, n in enumerate((3, 50, 17, 128, 1, 90, 33))]  # some span several steps
    batch = vectors(embed(api, inputs))
    for i, ids in enumerate(inputs):
        alone = vectors(embed(api, [ids]))[0]
        diff = float(np.max(np.abs(batch[i] - alone)))
        print(f"input {i} ({len(ids)} tokens): batch vs alone max|diff| {diff:.2e}")
        assert diff <= SAME_MAX_ABS


@pytest.mark.parametrize("ftype,model", [("f32", "e32"), ("f16", "e16"), ("q4_0", "eq")])
def test_vectors_equal_the_numpy_gptj_pooled_hidden_states(api, files, ftype, model):
    hparams, tensors = read_hparams(files[ftype]), read_tensors(files[ftype])
    inputs = [random_ids(100 + i, n) for i, n in enumerate((5, 40, 77, 128))]
    got = vectors(embed(api, inputs, model=model))
    for ids, row in zip(inputs, got):
        ref = pooled_embedding(tensors, hparams, ids)
        max_abs, cos = float(np.max(np.abs(row - ref))), float(row @ ref)
        print(f"{ftype:5s} {len(ids):3d} tokens: max|diff| {max_abs:.2e}  cosine {cos:.8f}")
        if ftype in ("f32", "f16"):
            assert max_abs <= EXACT_MAX_ABS and cos >= EXACT_MIN_COS, (max_abs, cos)
        else:
            assert cos >= QUANT_MIN_COS, cos


# ---- errors ----

@pytest.mark.parametrize("body,param,code,words", [
    ({"input": "hi", "dimensions": 64}, "dimensions", "invalid_value", "128"),
    ({"input": ""}, "input", "invalid_value", "empty"),
    ({"input": []}, "input", "invalid_value", "empty"),
    ({"input": ["ok", ""]}, "input", "invalid_value", "input[1]"),
    ({"input": [[1, 2], []]}, "input", "invalid_value", "input[1]"),
    ({"input": [1, 2, 512]}, "input", "invalid_value", "512"),
    ({"input": [[1], [5, -1]]}, "input", "invalid_value", "input[1]"),
    ({"input": [[1], list(range(N_CTX + 1))]}, "input", "context_length_exceeded", "input[1] has 129"),
    ({"input": ["short", "word " * 200]}, "input", "context_length_exceeded", "input[1] has more than 128"),
    ({"input": ["x"] * (MAX_INPUTS + 1)}, "input", "too_many_inputs", str(MAX_INPUTS)),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format", "invalid_value", ""),
    ({"input": "hi", "dimensions": 0}, "dimensions", "invalid_value", ""),
    ({"input": [[1], "a"]}, "input[1]", "invalid_value", ""),
    ({"input": ["a", 1]}, "input[1]", "invalid_value", ""),
    ({"input": [1.5]}, "input[0]", "invalid_value", ""),
    ({"input": [2**40]}, "input", "invalid_value", "outside the vocabulary"),
    ({"input": None}, "input", "invalid_value", ""),
    ({"input": "hi", "temperature": 1}, "temperature", "unknown_parameter", ""),
    ({"input": "hi", "model": "ect"}, "model", "unsupported_engine", "engine: ggml"),
])
def test_bad_requests_are_400s_naming_the_field(api, body, param, code, words):
    err = error(api, {"model": "e32", **body})
    assert (err["param"], err["code"]) == (param, code), err
    assert words in err["message"]


def test_an_exact_context_fits_and_an_unknown_model_is_404(api):
    assert len(embed(api, [list(range(N_CTX))])["data"]) == 1
    err = error(api, {"model": "nope", "input": "hi"}, 404)
    assert err["code"] == "model_not_found"


# ---- concurrency, disconnects ----

def test_concurrent_requests_are_all_answered_correctly(emb_server, api):
    jobs = [[random_ids(1000 * k + i, 5 + 13 * i + k) for i in range(k + 1)] for k in range(6)]
    want = [vectors(embed(api, inputs)) for inputs in jobs]
    got: dict[int, np.ndarray] = {}

    def run(k: int) -> None:
        with httpx.Client(base_url=emb_server.url, timeout=60) as c:
            got[k] = vectors(embed(c, jobs[k]))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == list(range(len(jobs)))
    for k in got:
        assert np.max(np.abs(got[k] - want[k])) <= SAME_MAX_ABS


def test_a_client_that_goes_away_frees_the_engine(emb_server, api):
    big = {"model": "e32", "input": [random_ids(i, N_CTX) for i in range(MAX_INPUTS)]}
    for _ in range(3):  # enough work that the request is still running when the client leaves
        try:
            httpx.post(emb_server.url + "/embeddings", json=big, timeout=0.05)
        except httpx.TimeoutException:
            pass

    def idle() -> bool:
        m = httpx.get(emb_server.base + "/ready", timeout=5).json()["models"]["e32"]
        return m["busy"] == 0 and m["queued"] == 0

    assert wait_for(idle, 30)
    assert len(embed(api, TEXTS)["data"]) == len(TEXTS)  # and it still serves
    assert wait_for(lambda: "outcome=client_gone" in emb_server.logs(), 30)


def test_a_crashed_engine_fails_the_request_with_500_and_is_replaced(emb_server, api):
    def details() -> dict:
        return httpx.get(emb_server.base + "/ready", timeout=5).json()["models"]["eslow"]

    pid = details()["worker_pids"][0]
    body = {"model": "eslow", "input": [random_ids(i, 512) for i in range(20)]}
    answer: dict = {}
    sender = threading.Thread(target=lambda: answer.update(r=httpx.post(emb_server.url + "/embeddings", json=body,
                                                                         timeout=60)))
    sender.start()
    assert wait_for(lambda: details()["busy"] > 0, 30)
    os.kill(pid, signal.SIGKILL)
    sender.join(60)
    r = answer["r"]
    assert r.status_code == 500, r.text
    validate("error", r.json())
    assert r.json()["error"]["code"] == "internal_error"
    assert wait_for(lambda: details()["alive"] == 1 and pid not in details()["worker_pids"], 30)
    assert len(embed(api, ["after the crash"], model="eslow")["data"]) == 1


# ---- clients ----

def test_openai_sdk_default_base64_path(emb_server, api):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=emb_server.url, api_key="none")
    got = client.embeddings.create(model="e32", input=TEXTS)  # the SDK asks for base64 and decodes it
    assert [d.index for d in got.data] == list(range(len(TEXTS)))
    want = vectors(embed(api, TEXTS))
    assert np.max(np.abs(np.asarray([d.embedding for d in got.data], np.float32) - want)) <= SAME_MAX_ABS
    assert got.usage.prompt_tokens == got.usage.total_tokens > 0
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model="ect", input="hi")
    assert bad.value.code == "unsupported_engine"


def test_langchain_embeddings(emb_server, api, monkeypatch, tmp_path):
    lc = pytest.importorskip("langchain_openai")
    # LangChain's default (check_embedding_ctx_length=True) tokenizes with tiktoken and sends its token ids;
    # tiktoken downloads its BPE file first, which fails offline (here: forced, whatever the network is)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    requests = pytest.importorskip("requests")
    default = lc.OpenAIEmbeddings(base_url=emb_server.url, api_key="none", model="e32")
    with pytest.raises(requests.exceptions.ConnectionError, match="cl100k_base.tiktoken"):
        default.embed_query("hello")  # in the client, before any request reaches the server
    # what works: send the texts and let the server tokenize them with the model's own tokenizer
    emb = lc.OpenAIEmbeddings(base_url=emb_server.url, api_key="none", model="e32",
                              check_embedding_ctx_length=False)
    docs = np.asarray(emb.embed_documents(TEXTS), np.float32)
    query = np.asarray(emb.embed_query(TEXTS[2]), np.float32)
    want = vectors(embed(api, TEXTS))
    assert np.max(np.abs(docs - want)) <= SAME_MAX_ABS
    assert np.max(np.abs(query - want[2])) <= SAME_MAX_ABS


def test_every_answer_is_quick_to_come_back(api):
    """Did not hang: a request of the most inputs, each a full context, is answered (generous bound)."""
    started = time.monotonic()
    body = embed(api, [random_ids(7000 + i, N_CTX) for i in range(MAX_INPUTS)])
    assert len(body["data"]) == MAX_INPUTS and time.monotonic() - started < 30
