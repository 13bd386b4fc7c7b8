"""The one mapping from API fields to engine fields (pure logic, no server)."""

from types import SimpleNamespace

import pytest

from backends.registry import ModelSpec, ServedModel
from backends.templates import BUILTIN_TEMPLATES
from backends.tokenizer import Tokenizer
from server.errors import APIError
from server.params import chat_plan, completion_plan, to_sampling
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.settings import Settings


def model(**spec) -> ServedModel:
    info = SimpleNamespace(n_vocab=128, n_ctx=64, eos_token_id=127)
    vocab = [bytes([b]) for b in range(128)]  # one token per ASCII byte
    return ServedModel(ModelSpec(id="m", path="m.bin", **spec), None, info, BUILTIN_TEMPLATES["plain"],
                       Tokenizer(vocab))


def test_registry_defaults_fill_what_the_request_leaves_out():
    m = model(sampling={"temperature": 0.5, "top_k": 7, "repetition_penalty": 1.2})
    s = to_sampling(CompletionRequest(model="m", prompt="x"), m)
    assert (s.temperature, s.top_k, s.repetition_penalty) == (0.5, 7, 1.2)
    s = to_sampling(CompletionRequest(model="m", prompt="x", temperature=0, top_k=3, seed=9), m)
    assert s.greedy and s.top_k == 3 and s.seed == 9


def test_seed_is_offset_per_choice_and_random_without_seed():
    plan = completion_plan(CompletionRequest(model="m", prompt="x", n=3, seed=10), model(), Settings())
    assert [plan.seed_for(i).seed for i in range(3)] == [10, 11, 12]
    a = completion_plan(CompletionRequest(model="m", prompt="x"), model(), Settings()).sampling.seed
    b = completion_plan(CompletionRequest(model="m", prompt="x"), model(), Settings()).sampling.seed
    assert a != b


def test_stops_merge_request_and_model():
    plan = completion_plan(CompletionRequest(model="m", prompt="x", stop="END"), model(stop=["###"]),
                           Settings())
    assert plan.stops == ["END", "###"]


def test_prompt_shapes_and_default_prompt():
    p = completion_plan(CompletionRequest(model="m", prompt=None), model(), Settings())
    assert p.prompts == [[127]]
    p = completion_plan(CompletionRequest(model="m", prompt=[[1, 2], [3]]), model(), Settings())
    assert p.prompts == [[1, 2], [3]]
    with pytest.raises(APIError) as err:
        completion_plan(CompletionRequest(model="m", prompt=[128]), model(), Settings())
    assert err.value.param == "prompt"


def test_limits_are_checked_before_any_work():
    with pytest.raises(APIError) as err:
        completion_plan(CompletionRequest(model="m", prompt="x", max_tokens=65), model(), Settings())
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(APIError) as err:
        completion_plan(CompletionRequest(model="m", prompt="x", max_tokens=20), model(max_tokens_cap=10),
                        Settings())
    assert err.value.param == "max_tokens"
    with pytest.raises(APIError):
        completion_plan(CompletionRequest(model="m", prompt="x", n=9), model(), Settings(max_n=8))
    with pytest.raises(APIError) as err:  # 60 prompt tokens + 5 > 64, caught before queueing
        completion_plan(CompletionRequest(model="m", prompt="a" * 60, max_tokens=5), model(), Settings())
    assert err.value.code == "context_length_exceeded" and err.value.param == "prompt"
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "a" * 70}])
    with pytest.raises(APIError) as err:
        chat_plan(chat, model(), Settings())
    assert err.value.code == "context_length_exceeded" and err.value.param == "messages"


def test_chat_default_max_tokens_shrinks_to_what_fits():
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "a" * 50}])
    assert chat_plan(chat, model(sampling={"max_tokens": 40}), Settings()).max_tokens == 64 - 51


def test_chat_renders_the_template_and_maps_logprobs():
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                top_logprobs=3, max_completion_tokens=5)
    plan = chat_plan(req, model(system_prompt="S"), Settings())
    assert plan.prompts == [list(b"S\nhi\n")] and plan.logprobs == 3 and plan.max_tokens == 5


@pytest.mark.parametrize("field,value", [
    ("tool_choice", "auto"), ("function_call", {"name": "f"}),
    ("audio", {}), ("store", True), ("reasoning_effort", "low"), ("prompt_cache_key", "k"),
])
def test_chat_features_that_do_not_exist_here_are_named(field, value):
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **{field: value})
    with pytest.raises(APIError) as err:
        chat_plan(req, model(), Settings())
    assert err.value.status == 400 and err.value.param == field


def test_neutral_values_of_those_fields_are_accepted():
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tool_choice="none",
                                response_format={"type": "text"}, store=False, service_tier="auto",
                                parallel_tool_calls=True, user="u")
    assert chat_plan(req, model(), Settings()).prompts == [list(b"hi\n")]
