"""The Python tokenizer gives exactly the engine's token ids."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.ggml.reader import read_vocab
from backends.ggml.writer import GPTJConfig, default_vocab, write_model
from backends.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from backends.engine import Engine

    path = Path(tmp_path_factory.mktemp("tok")) / "m.bin"
    write_model(path, GPTJConfig(n_vocab=600, n_embd=64, n_layer=1, ftype="q8_0"), vocab=default_vocab(600))
    return Tokenizer(read_vocab(path)), Engine(str(path))


SAMPLES = [
    "", "Hello world", "The quick brown fox's tail, isn't it?", "  leading and trailing  ",
    "numbers 12345 and 3.14", "tabs\tand\nnewlines\n\n", "<|endoftext|>", "héllo wörld 日本語 😀",
    "don't 've 'll 're 'm 'd", "a" * 300, "mixed123abc!!!???", "\x01\x02 control",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_matches_engine_on_samples(pair, text):
    tok, engine = pair
    assert tok.encode(text) == engine.tokenize(text)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00"),
               max_size=60))
def test_matches_engine_on_any_text(pair, text):
    tok, engine = pair
    assert tok.encode(text) == engine.tokenize(text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("the quick brown fox 's 've\n\t 0123 ,.!?é日")), max_size=80))
def test_matches_engine_on_wordy_text(pair, text):
    tok, engine = pair
    assert tok.encode(text) == engine.tokenize(text)


def test_nul_is_a_token_not_an_end_of_string(pair):
    """The engine's binding passes text as a C string and cuts it at NUL; ours keeps the byte."""
    tok, engine = pair
    assert tok.encode("a\x00b") == [tok.ids[b"a"], tok.ids[b"\x00"], tok.ids[b"b"]]
    assert engine.tokenize("a\x00b") == [tok.ids[b"a"]]


def test_decode_round_trips_ascii(pair):
    tok, _ = pair
    assert tok.decode(tok.encode("Hello there, world 42!")) == b"Hello there, world 42!"
