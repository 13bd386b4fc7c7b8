"""backends/grammar.py: llguidance constraints, masks on the test vocabularies, sampling under a mask."""

from __future__ import annotations

import json
import pickle

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.batched.sampling import Row, sample_row
from backends.ggml.writer import default_vocab
from backends.grammar import (
    Constraint,
    GrammarError,
    Matcher,
    Vocab,
    check,
    grammar_failure,
    json_object,
    json_schema,
    lark,
    vocab_for,
)
from backends.types import SamplingParams
from tests.models import RANDOM_EOS_ID, successor_vocab

PIECES = default_vocab(512)  # write_random's vocabulary
EOS = RANDOM_EOS_ID
MAX_STEPS = 400

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 6}, "admin": {"type": "boolean"}},
                "required": ["name", "admin"],
                "additionalProperties": False,
            },
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
        },
        "required": ["user", "id"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                              "minItems": 1, "maxItems": 4}},
        "required": ["xs"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, None]}},
        "required": ["colour", "size"],
        "additionalProperties": False,
    },
    "number_range": {
        "type": "object",
        "properties": {"t": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                       "n": {"type": "integer", "exclusiveMinimum": 10, "maximum": 20}},
        "required": ["t", "n"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "integer", "minimum": 0, "maximum": 9},
                       "c": {"type": "string", "maxLength": 3}},
        "required": ["a"],
        "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[a-z]{1,4}-[0-9]{2}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "top_level_array": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 5},
}


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return vocab_for(PIECES, EOS)


def generate(matcher: Matcher, seed: int, temperature: float = 1.0) -> tuple[list[int], bool]:
    """Sample random logits under the mask until the grammar is done; (tokens, ended by EOS)."""
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=temperature, seed=seed)
    out: list[int] = []
    for step in range(MAX_STEPS):
        logits = (rng.standard_normal(len(PIECES)) * 3).astype(np.float32)
        got = sample_row(logits, Row(params, out, step=step, allowed=matcher.allowed()), PIECES)
        assert got.error is None, got.error
        if got.token == EOS:
            return out, True
        matcher.accept(got.token)
        assert matcher.error is None, matcher.error
        out.append(got.token)
        if matcher.done:
            return out, False
    raise AssertionError(f"the grammar did not end in {MAX_STEPS} tokens: {b''.join(PIECES[t] for t in out)!r}")


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), temperature=st.sampled_from([0.0, 0.7, 1.0, 2.0]))
def test_sampled_output_validates_against_the_schema(vocab, name, seed, temperature):
    schema = SCHEMAS[name]
    tokens, _ = generate(Matcher(json_schema(schema), vocab), seed, temperature)
    text = b"".join(PIECES[t] for t in tokens).decode("utf-8")
    jsonschema.validate(json.loads(text), schema)


def test_json_object_mask_allows_only_an_opening_brace_first(vocab):
    matcher = Matcher(json_object(), vocab)
    allowed = matcher.allowed()
    assert allowed.shape == (len(PIECES),) and allowed.dtype == bool
    starts = {PIECES[i] for i in np.flatnonzero(allowed)}
    assert starts and all(p.startswith(b"{") for p in starts), starts
    assert not allowed[EOS]
    for piece in (b"{", b'"', b"a", b'"', b":", b"1", b"}"):
        assert matcher.allowed()[PIECES.index(piece)], piece
        matcher.accept(PIECES.index(piece))
    assert matcher.done and matcher.error is None


def test_eos_is_allowed_only_where_the_grammar_may_end():
    pieces, _ = successor_vocab()
    vocab = Vocab(pieces, 256)
    matcher = Matcher(lark('start: "a" "b"?'), vocab)
    assert not matcher.allowed()[256]
    matcher.accept(pieces.index(b"a"))
    allowed = matcher.allowed()
    assert allowed[256] and allowed[pieces.index(b"b")] and not matcher.done
    assert np.flatnonzero(allowed).tolist() == sorted([256, pieces.index(b"b")])
    matcher.accept(pieces.index(b"b"))
    assert matcher.done


def test_control_pieces_never_match_grammar_text(vocab):
    matcher = Matcher(json_schema({"type": "string", "maxLength": 40}), vocab)
    matcher.accept(PIECES.index(b'"'))
    allowed = matcher.allowed()
    extra = [i for i, p in enumerate(PIECES) if p.startswith(b"<|extra_")]
    assert extra and not allowed[extra].any() and not allowed[EOS]
    assert allowed[PIECES.index(b"a")]


def test_a_refused_token_puts_the_matcher_in_error(vocab):
    matcher = Matcher(json_object(), vocab)
    matcher.accept(PIECES.index(b"a"))
    assert matcher.error and not matcher.done


def test_unsupported_schema_feature_is_named():
    with pytest.raises(GrammarError, match="if"):
        json_schema({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}})
    with pytest.raises(GrammarError, match="nope"):
        json_schema({"$ref": "#/nope"})
    with pytest.raises(GrammarError):
        json_schema(["not", "a", "schema"])


def test_bad_lark_grammar_is_refused_with_its_position():
    with pytest.raises(GrammarError, match="unknown name"):
        lark("start: foo")


def test_check_compiles_against_the_vocabulary():
    check(json_schema(SCHEMAS["nested"]), PIECES, EOS)
    with pytest.raises(GrammarError):
        check(Constraint('{"grammars": [{"lark_grammar": "start: nothing_here"}]}'), PIECES, EOS)


def test_compiled_grammars_are_cached_per_grammar_and_bounded():
    vocab = Vocab(PIECES, EOS, cache_size=2)
    a, b, c = json_object(), json_schema(SCHEMAS["enum"]), lark('start: "x"')
    Matcher(a, vocab)
    Matcher(a, vocab)
    assert (vocab.hits, vocab.misses) == (1, 1)
    Matcher(b, vocab)
    Matcher(c, vocab)  # evicts a, the least recently used
    Matcher(a, vocab)
    assert (vocab.hits, vocab.misses) == (1, 4)
    one, two = Matcher(b, vocab), Matcher(b, vocab)  # cached: each sequence still gets its own state
    one.accept(PIECES.index(b"{"))
    assert not two.allowed()[PIECES.index(b"}")] and two.allowed()[PIECES.index(b"{")]


def test_vocab_is_built_once_per_pieces():
    assert vocab_for(PIECES, EOS) is vocab_for(PIECES, EOS)
    assert vocab_for(list(PIECES), EOS) is not vocab_for(PIECES, EOS)


def test_constraint_crosses_a_pipe_inside_sampling_params():
    params = SamplingParams(temperature=0.5, constraint=json_schema(SCHEMAS["enum"]))
    assert pickle.loads(pickle.dumps(params)) == params


def test_sampler_never_picks_a_masked_token_even_with_top_k_and_bias():
    allowed = np.zeros(len(PIECES), dtype=bool)
    allowed[[5, 9]] = True
    logits = np.zeros(len(PIECES), dtype=np.float32)
    logits[100] = 50.0  # the model's favourite is masked
    for seed in range(50):
        for params in (SamplingParams(temperature=1.0, top_k=40, seed=seed), SamplingParams(temperature=0.0),
                       SamplingParams(top_p=0.5, seed=seed, logit_bias={100: 10.0}, repetition_penalty=1.3)):
            got = sample_row(logits, Row(params, [100, 5], allowed=allowed, logprobs=1), PIECES)
            assert got.token in (5, 9)
            assert got.logprob.top[0][0] == PIECES[100]  # logprobs report the model's raw distribution


MANY_OPTIONAL = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(600)}}


def test_check_computes_the_first_masks_and_refuses_what_fails_there():
    constraint = json_schema(MANY_OPTIONAL)  # compiles: llguidance's Earley limit is hit only after "{"
    with pytest.raises(GrammarError, match="max is") as err:
        check(constraint, PIECES, EOS)
    assert len(str(err.value)) <= 300 and "\n" not in str(err.value)


def test_check_follows_forced_tokens_before_the_failing_mask():
    nested = {"type": "object", "properties": {"inner": MANY_OPTIONAL}, "required": ["inner"],
              "additionalProperties": False}
    with pytest.raises(GrammarError):
        check(json_schema(nested), PIECES, EOS)


def test_a_failed_matcher_reports_one_short_line(vocab):
    matcher = Matcher(json_schema(MANY_OPTIONAL), vocab)
    matcher.accept(PIECES.index(b"{"))
    matcher.allowed()
    message = grammar_failure(matcher)
    assert "max is" in message and len(message) <= 400 and "\n" not in message


def test_grammar_errors_are_cut_to_one_short_line():
    assert str(GrammarError("first line\n<state>" + "x" * 5000)) == "first line"
    assert len(str(GrammarError("y" * 5000))) == 300
