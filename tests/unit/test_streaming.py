"""Stop-sequence holdback and UTF-8 assembly (pure logic)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from server.streaming import ChoiceState, TextAssembler


def run(pieces: list[bytes], stops: list[str]) -> tuple[str, list[str], bool]:
    asm = TextAssembler(stops)
    deltas = [asm.feed(p) for p in pieces]
    deltas.append(asm.finish())
    return "".join(deltas), deltas, asm.stopped


def test_plain_text_passes_through():
    text, deltas, stopped = run([b"Hel", b"lo", b" world"], [])
    assert text == "Hello world" and not stopped
    assert deltas[:3] == ["Hel", "lo", " world"]


def test_multibyte_character_split_across_tokens_is_held_not_replaced():
    data = "é日😀".encode()
    text, deltas, _ = run([bytes([b]) for b in data], [])
    assert text == "é日😀"
    assert all("\ufffd" not in d for d in deltas)


def test_stop_sequence_split_across_tokens_never_leaks():
    text, deltas, stopped = run([b"ab", b"c#", b"#", b"#x", b"yz"], ["###"])
    assert stopped and text == "abc"
    assert all("#" not in d for d in deltas)


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    text, deltas, stopped = run([b"a#", b"#b"], ["###"])
    assert not stopped and text == "a##b"
    assert deltas[0] == "a"


def test_earliest_of_several_stops_wins():
    text, _, stopped = run([b"one two three"], ["three", "two"])
    assert stopped and text == "one "


def test_invalid_utf8_becomes_replacement_only_when_really_invalid():
    text, _, _ = run([b"a\xff", b"b"], [])
    assert text == "a\ufffdb"


def test_incomplete_tail_at_end_is_flushed_as_replacement():
    text, _, _ = run([b"ok\xe6\x97"], [])
    assert text == "ok\ufffd"


def test_choice_records_align_with_released_text():
    state = ChoiceState(0, TextAssembler(["cd"]))
    for piece in [b"a", b"b", b"c", b"d", b"e"]:
        state.add(piece, None)
        if state.assembler.stopped:
            break
    state.close()
    assert state.full_text == "ab"
    records = state.take_records(final=True)
    assert [r.piece for r in records] == [b"a", b"b"]


texts = st.text(alphabet=st.sampled_from(list("ab#é日😀 \n")), max_size=40)


@settings(max_examples=300, deadline=None)
@given(text=texts, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=20),
       stops=st.lists(st.text(alphabet=st.sampled_from(list("ab#é")), min_size=1, max_size=4), max_size=4))
def test_any_byte_split_stops_where_a_stop_first_completes(text, cuts, stops):
    """Joined deltas equal the reference: generation stops at the first token boundary where a stop
    sequence is complete, cut at the earliest start among the complete ones; no delta holds a
    partial character, no stop sequence leaks."""
    data = text.encode()
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[i:j] for i, j in zip([0, *points], [*points, len(data)])]
    joined, deltas, stopped = run(pieces, stops)
    expected, expect_stop = text, False
    end = 0
    for piece in pieces:
        end += len(piece)
        prefix = data[:end].decode("utf-8", errors="ignore")  # an incomplete tail is still held
        hits = [i for i in (prefix.find(s) for s in stops) if i >= 0]
        if hits:
            expected, expect_stop = prefix[: min(hits)], True
            break
    assert joined == expected
    assert stopped == expect_stop
    assert all("\ufffd" not in d for d in deltas)
    for s in stops:
        assert s not in joined


def test_whole_text_in_one_piece_cuts_at_the_earliest_stop():
    assert run([b"a#a"], ["#", "a#a"])[0] == ""
    assert run([b"a#", b"a"], ["#", "a#a"])[0] == "a"  # "#" completed first: generation stops there


def test_fast_text_chunks_equal_the_protocol_models():
    import json

    from server.protocol import Delta
    from server.render import Renderer

    for usage in (False, True):
        r = Renderer("chatcmpl-1", 123, "m", usage)
        for text in ["", "plain", 'quote " and \\ backslash', "é日😀", "\x00\n\t", "\u2028"]:
            for index in (0, 3):
                assert json.loads(r.text_chunk("chat", index, text)) == r.chat_chunk(index, Delta(content=text), None)
                assert json.loads(r.text_chunk("completion", index, text)) == r.completion_chunk(index, text, None)
