"""POST /v1/completions over raw HTTP, checked against OpenAI's schemas."""

import httpx
import pytest

from tests.e2e.sse import stream
from tests.schemas import usage_counts, validate


@pytest.fixture()
def client(engine_server):
    """A client of the session server of each engine: these tests run on both."""
    with httpx.Client(base_url=engine_server.url, timeout=60) as c:
        yield c


def complete(client, **body):
    r = client.post("/completions", json={"model": "succ", **body})
    assert r.status_code == 200, r.text
    validate("completion", r.json())
    return r.json()


def test_greedy_text_usage_and_finish_reasons(client):
    body = complete(client, prompt="x", max_tokens=10)
    assert body["object"] == "text_completion" and body["model"] == "succ"
    assert body["choices"] == [{"text": "yz", "index": 0, "logprobs": None, "finish_reason": "stop"}]
    assert usage_counts(body["usage"]) == (1, 2, 3)
    body = complete(client, prompt="a", max_tokens=4)
    assert body["choices"][0]["text"] == "bcde" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4


def test_alias_resolves_to_the_model(client):
    body = complete(client, model="succ-alias", prompt="x")
    assert body["model"] == "succ" and body["choices"][0]["text"] == "yz"


def test_prompt_shapes(client):
    body = complete(client, prompt=["x", "a"], max_tokens=3)
    assert [c["text"] for c in body["choices"]] == ["yz", "bcd"]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == 2
    x, a = ord("x"), ord("a")
    assert complete(client, prompt=[x], max_tokens=3)["choices"][0]["text"] == "yz"
    body = complete(client, prompt=[[x], [a, a]], max_tokens=2)
    assert [c["text"] for c in body["choices"]] == ["yz", "bc"]
    assert body["usage"]["prompt_tokens"] == 3


def test_echo(client):
    assert complete(client, prompt="x", echo=True)["choices"][0]["text"] == "xyz"
    assert complete(client, prompt=[ord("w")], echo=True)["choices"][0]["text"] == "wxyz"


def test_max_tokens_zero_returns_nothing(client):
    body = complete(client, prompt="a", max_tokens=0)
    assert body["choices"][0]["text"] == "" and body["choices"][0]["finish_reason"] == "length"


def test_stop_sequence_split_across_tokens(client):
    body = complete(client, prompt="a", max_tokens=20, stop=["def"])
    assert body["choices"][0]["text"] == "bc" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 5  # b c d e f: the stop completed on "f"
    chunks, _ = stream(client, "/completions", {"model": "succ", "prompt": "a", "max_tokens": 20,
                                                "stop": "def"})
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == "bc" and all("d" not in t for t in texts)


def test_multibyte_utf8_is_never_split(client):
    body = complete(client, prompt="5", max_tokens=10)
    assert body["choices"][0]["text"] == "6789é日 done"
    chunks, _ = stream(client, "/completions", {"model": "succ", "prompt": "5", "max_tokens": 10})
    texts = [c["choices"][0]["text"] for c in chunks]
    assert all("\ufffd" not in t for t in texts)
    assert "".join(texts) == "6789é日 done"


def test_non_ascii_prompt(client):
    body = complete(client, prompt="héllo wörld 日本語 😀 x", max_tokens=5)
    assert body["choices"][0]["text"] == "yz"
    assert body["usage"]["prompt_tokens"] == len("héllo wörld 日本語 😀 x".encode())


def test_stream_framing_finish_and_usage(client):
    chunks, raw = stream(client, "/completions", {"model": "succ", "prompt": "a", "max_tokens": 3,
                                                  "stream_options": {"include_usage": True}})
    for c in chunks:
        validate("completion_chunk", c)
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    body, usage_chunk = chunks[:-1], chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in body)
    assert [c["choices"][0]["finish_reason"] for c in body[:-1]] == [None] * (len(body) - 1)
    assert body[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in body) == "bcd"


def test_stream_without_usage_has_no_usage_field(client):
    chunks, _ = stream(client, "/completions", {"model": "succ", "prompt": "x"})
    assert all("usage" not in c for c in chunks)


def test_seed_makes_sampling_reproducible_and_stream_matches(client):
    req = {"model": "rand", "prompt": "Once upon", "max_tokens": 24, "temperature": 1.0, "seed": 42}
    first = complete(client, **req)["choices"][0]["text"]
    again = complete(client, **req)["choices"][0]["text"]
    other = complete(client, **{**req, "seed": 43})["choices"][0]["text"]
    assert first == again and first != other
    chunks, _ = stream(client, "/completions", req)
    assert "".join(c["choices"][0]["text"] for c in chunks) == first


def test_n_choices_with_seed(client):
    req = {"model": "rand", "prompt": "Hello", "max_tokens": 8, "n": 3, "seed": 5}
    body = complete(client, **req)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body == {**complete(client, **req), "id": body["id"], "created": body["created"]}
    texts = {c["choices"][0]["index"]: "" for c in []}
    chunks, _ = stream(client, "/completions", req)
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
    assert [texts[i] for i in range(3)] == [c["text"] for c in body["choices"]]


def token_bytes(token: str) -> bytes:
    """The bytes of a logprobs token (`bytes:\\xNN...` for partial UTF-8, else the text)."""
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token[len("bytes:"):].split("\\x")[1:])
    return token.encode()


def test_logprobs(client):
    body = complete(client, model="rand", prompt="Hello", max_tokens=5, logprobs=2, temperature=0)
    lp = body["choices"][0]["logprobs"]
    n = body["usage"]["completion_tokens"]
    assert n >= 1 and len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    # a token that is not whole UTF-8 (a character split across byte tokens) reads `bytes:\xNN...`, as
    # OpenAI writes it: the tokens' bytes spell the text exactly
    assert b"".join(token_bytes(t) for t in lp["tokens"]).decode() == body["choices"][0]["text"]
    for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and len(top) <= 2
        assert max(top.values()) == pytest.approx(value)  # greedy picks the most likely token
    assert lp["text_offset"][0] == 0
    for i, offset in enumerate(lp["text_offset"]):  # characters before the token (a partial one: before its character)
        assert offset == len(b"".join(token_bytes(t) for t in lp["tokens"][:i]).decode("utf-8", errors="ignore"))


def test_logit_bias_and_penalties(client):
    base = {"model": "succ", "prompt": "a", "max_tokens": 3}
    assert complete(client, **base)["choices"][0]["text"] == "bcd"
    assert complete(client, **base, logit_bias={str(ord("q")): 100})["choices"][0]["text"] == "qqq"
    # greedy on the random model, EOS banned: it falls into a repeat, which the penalties break
    eos = 292
    req = {"model": "rand", "prompt": "Hello", "max_tokens": 24, "temperature": 0,
           "logit_bias": {str(eos): -100}, "logprobs": 0}
    plain = complete(client, **req)["choices"][0]["logprobs"]["tokens"]
    assert len(plain) == 24 and len(set(plain)) < 20
    for penalty in ("frequency_penalty", "presence_penalty"):
        tokens = complete(client, **req, **{penalty: 2.0})["choices"][0]["logprobs"]["tokens"]
        assert len(tokens) == 24 and len(set(tokens)) > len(set(plain)), penalty


@pytest.mark.parametrize("body,param", [
    ({"suffix": "x"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"echo": True, "logprobs": 1}, "logprobs"),
    ({"unknown_thing": 1}, "unknown_thing"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"n": 1000}, "n"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_parameters_are_400_naming_the_param(client, body, param):
    r = client.post("/completions", json={"model": "succ", "prompt": "x", **body})
    assert r.status_code == 400, r.text
    validate("error", r.json())
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["param"].startswith(param)


def test_context_length_exceeded(client):
    r = client.post("/completions", json={"model": "rand", "prompt": "x", "max_tokens": 500})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/completions", json={"model": "rand", "prompt": [1] * 120, "max_tokens": 20})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    validate("error", r.json())
    r = client.post("/completions", json={"model": "rand", "prompt": [1] * 120, "max_tokens": 20,
                                          "stream": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert client.post("/completions", json={"model": "rand", "prompt": [1] * 120,
                                             "max_tokens": 8}).status_code == 200
