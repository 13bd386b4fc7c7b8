"""What cannot fit is refused by its size before any tokenizing or per-id work (pure logic, no server)."""

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.ggml.writer import default_vocab
from backends.registry import ModelSpec, ServedModel
from backends.templates import BUILTIN_TEMPLATES
from backends.tokenizer import Tokenizer
from server.errors import APIError
from server.params import BIG_WORK, chat_plan, completion_plan, to_sampling, work_size
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.settings import Settings

N_CTX = 64


class SpyTokenizer(Tokenizer):
    """Counts encode calls."""

    def __init__(self, vocab: list[bytes]) -> None:
        super().__init__(vocab)
        self.calls = 0

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        self.calls += 1
        return super().encode(text, limit)


def model(vocab: list[bytes] | None = None) -> ServedModel:
    vocab = vocab or default_vocab(512)
    info = SimpleNamespace(n_vocab=len(vocab), n_ctx=N_CTX, eos_token_id=0)
    return ServedModel(ModelSpec(id="m", path="m.bin"), None, info, BUILTIN_TEMPLATES["plain"],
                       SpyTokenizer(vocab))


def refused(fn, req, m: ServedModel) -> APIError:
    with pytest.raises(APIError) as err:
        fn(req, m, Settings())
    return err.value


def test_a_text_too_long_in_bytes_is_refused_without_tokenizing():
    m = model()
    assert m.tokenizer.covers_every_byte
    huge = "a" * (4 * 1024 * 1024)  # one 4 MiB word: seconds of tokenizing before the fix
    err = refused(completion_plan, CompletionRequest(model="m", prompt=huge, max_tokens=4), m)
    assert err.code == "context_length_exceeded" and err.param == "prompt"
    assert f"{len(huge)} bytes" in err.message
    err = refused(completion_plan, CompletionRequest(model="m", prompt=["x", huge]), m)
    assert err.code == "context_length_exceeded"
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "日" * 100_000}])
    err = refused(chat_plan, chat, m)
    assert err.code == "context_length_exceeded" and err.param == "messages"
    assert m.tokenizer.calls == 0


def test_the_byte_bound_is_exact_at_its_edge():
    """Just within the bound the prompt is tokenized (and may still be refused by its count)."""
    m = model()
    room = N_CTX - 4
    cap = room * m.tokenizer.longest
    err = refused(completion_plan, CompletionRequest(model="m", prompt="a" * cap, max_tokens=4), m)
    assert err.code == "context_length_exceeded" and m.tokenizer.calls == 1
    refused(completion_plan, CompletionRequest(model="m", prompt="a" * (cap + 1), max_tokens=4), m)
    assert m.tokenizer.calls == 1


def test_without_every_byte_in_the_vocabulary_there_is_no_byte_bound_but_tokenizing_stops_early():
    vocab = [bytes([b]) for b in range(128)]  # no token for bytes >= 128: those are dropped
    m = model(vocab)
    assert not m.tokenizer.covers_every_byte and m.tokenizer.max_bytes(10) is None
    err = refused(completion_plan, CompletionRequest(model="m", prompt="ab" * 100_000, max_tokens=4), m)
    assert err.code == "context_length_exceeded" and "at least" in err.message and m.tokenizer.calls == 1
    # 200,000 dropped bytes and one real token: not refused by size
    plan = completion_plan(CompletionRequest(model="m", prompt="é" * 100_000 + "a", max_tokens=4), m, Settings())
    assert plan.prompts == [[ord("a")]]


def test_token_id_lists_are_refused_by_length_before_checking_each_id():
    m = model()
    ids = [10**9] * 2_000_000  # every id is outside the vocabulary; the length alone decides
    err = refused(completion_plan, CompletionRequest(model="m", prompt=ids, max_tokens=4), m)
    assert err.code == "context_length_exceeded" and "2000000 in the prompt" in err.message
    err = refused(completion_plan, CompletionRequest(model="m", prompt=[[1], ids]), m)
    assert err.code == "context_length_exceeded"
    err = refused(completion_plan, CompletionRequest(model="m", prompt=[10**9], max_tokens=4), m)
    assert err.param == "prompt" and "outside the vocabulary" in err.message


def test_a_prompt_that_fits_is_unchanged():
    m = model()
    plan = completion_plan(CompletionRequest(model="m", prompt="hello world", max_tokens=4), m, Settings())
    assert plan.prompts == [m.tokenizer.encode("hello world")]
    plan = completion_plan(CompletionRequest(model="m", prompt=[[1, 2], [3]], max_tokens=4), m, Settings())
    assert plan.prompts == [[1, 2], [3]]


@pytest.mark.parametrize("digits", [4301, 5000, 100_000])
def test_a_logit_bias_key_of_thousands_of_digits_is_a_400(digits):
    req = CompletionRequest(model="m", prompt="x", logit_bias={"7" * digits: 1})
    with pytest.raises(APIError) as err:
        to_sampling(req, model())
    assert err.value.status == 400 and err.value.param == "logit_bias"
    assert len(err.value.message) < 300  # the key is shortened, not echoed whole


def test_logit_bias_keys_with_leading_zeros_are_token_ids():
    bias = to_sampling(CompletionRequest(model="m", prompt="x", logit_bias={"0" * 5000 + "7": -5}), model())
    assert bias.logit_bias == {7: -5.0}


def test_more_logit_bias_entries_than_tokens_are_refused():
    req = CompletionRequest(model="m", prompt="x", logit_bias={"0" * k + "1": 1 for k in range(600)})
    with pytest.raises(APIError) as err:
        to_sampling(req, model())
    assert err.value.param == "logit_bias" and "600 entries" in err.value.message


def test_work_size_is_cheap_and_sends_big_requests_off_the_loop():
    s = Settings()
    assert work_size(CompletionRequest(model="m", prompt="x"), s) < BIG_WORK
    assert work_size(CompletionRequest(model="m", prompt=[1] * 2_000_000), s) >= BIG_WORK
    assert work_size(CompletionRequest(model="m", prompt=["a" * 10_000] * 3), s) >= BIG_WORK
    assert work_size(CompletionRequest(model="m", prompt="x", logit_bias={str(i): 1 for i in range(20_000)}),
                     s) >= BIG_WORK
    many = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": ""}] * 1000)
    assert work_size(many, s) >= BIG_WORK


def test_prompt_shapes_are_validated_as_one_shape():
    """A list is validated as the one shape its first item implies (one error, not one per item)."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        CompletionRequest(model="m", prompt=[1] * 100_000 + ["a"])
    assert len(err.value.errors()) == 1 and err.value.errors()[0]["loc"][-1] == 100_000
    with pytest.raises(ValidationError) as err:
        CompletionRequest(model="m", prompt=5)
    assert err.value.errors()[0]["loc"] == ("prompt",)
    assert CompletionRequest(model="m", prompt=[]).prompt == []


# ---- the tokenizer's cost on one long word ----

class CountingDict(dict):
    """A dict that counts membership tests and lookups."""

    lookups = 0

    def __contains__(self, key):
        CountingDict.lookups += 1
        return super().__contains__(key)

    def get(self, key, default=None):
        CountingDict.lookups += 1
        return super().get(key, default)

    def __getitem__(self, key):
        CountingDict.lookups += 1
        return super().__getitem__(key)


def test_one_long_word_costs_a_few_lookups_per_token_not_one_per_vocabulary_length():
    vocab = default_vocab(512) + [b"q" * 200]  # a long piece: the old search tried every length up to it
    tok = Tokenizer(vocab)
    tok.ids = CountingDict(tok.ids)
    CountingDict.lookups = 0
    word = "ab" * 5_000
    ids = tok.encode(word)
    assert len(ids) == 10_000  # "a" and "b" are single-byte tokens
    assert CountingDict.lookups < 4 * len(ids), CountingDict.lookups  # was ~200 per token


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab the quick 's 've\n\t 01 ,.!é日<|endoftext|>")), max_size=120),
       limit=st.integers(0, 40))
def test_a_limited_encode_is_a_prefix_of_the_full_one(text, limit):
    tok = Tokenizer(default_vocab(600))
    full, part = tok.encode(text), tok.encode(text, limit)
    assert part == full[:len(part)]
    assert part == full or len(part) > limit
