"""benchmarks.embeddings_report / embeddings_http / embeddings: the embeddings benchmark's pure logic and report."""

from __future__ import annotations

import json

from benchmarks import embeddings_report as rep
from benchmarks.embeddings import make_inputs
from benchmarks.embeddings_http import carries_text, final_usage, text_times


def test_form_order_puts_every_form_in_every_place():
    orders = [rep.form_order(i) for i in range(len(rep.FORMS))]
    assert all(sorted(o) == sorted(rep.FORMS) for o in orders)
    for place in range(len(rep.FORMS)):
        assert {o[place] for o in orders} == set(rep.FORMS)


def test_window_rate_counts_texts_inside_the_window_only():
    times = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert rep.window_rate(times, 1.0, 3.0) == 2.0  # 1.5, 2.0, 2.5, 3.0 in (1, 3]
    assert rep.window_rate(times, 2.0, 2.0) is None


def _stream(step: float, n: int) -> list[float]:
    return [i * step for i in range(n)]


def test_pair_rates_compare_both_streams_over_the_embedding_window():
    pair = {"alone": {"times": _stream(0.1, 200), "others_share": 0.0},
            "flood": {"times": _stream(0.2, 100), "window": [1.0, 5.0], "embedding_tokens": 2000,
                      "others_share": 0.1}}
    r = rep.pair_rates(pair)
    assert round(r["alone_tok_s"]) == 10 and round(r["flood_tok_s"]) == 5
    assert round(r["ratio"], 2) == 0.5 and r["covered"]
    assert r["embedding_tok_s"] == 500


def test_pair_rates_cut_each_window_where_its_stream_ended():
    pair = {"alone": {"times": _stream(0.1, 21), "others_share": 0.0},
            "flood": {"times": _stream(0.2, 16), "window": [1.0, 5.0], "embedding_tokens": 100,
                      "others_share": 0.0}}
    r = rep.pair_rates(pair)
    assert not r["covered"] and round(r["flood_tok_s"]) == 5  # over (1.0, 3.0], the flooded stream's end
    assert round(r["alone_tok_s"]) == 10 and r["alone_window_s"] == 1.0  # over (1.0, 2.0], the alone one's end


def test_case_keys_name_inputs_and_tokens():
    assert rep.case_key(32, 8) == "32x8"


def test_derive_overhead_is_the_median_of_quiet_pair_ratios():
    pairs = [{"chat": {"total": t, "ttft": None, "tokens": 16}, "responses": {"total": t * q, "ttft": None,
                                                                             "tokens": 16}, "others_share": s}
             for t, q, s in [(1.0, 1.1, 0.1), (2.0, 1.0, 0.03), (1.0, 1.02, 0.02), (1.0, 3.0, 0.5)]]
    d = rep.derive_overhead({"x": pairs})["x"]
    assert round(d["ratio"], 3) == 1.02 and d["same_tokens"] and d["others_share"] == 0.1
    assert round(d["diff_ms"]) == 20 and d["ttft_ratio"] is None and (d["pairs"], d["runs"]) == (3, 4)


def test_derive_throughput_leaves_out_measurements_of_a_busy_machine():
    def m(tok_s: float, share: float) -> dict:
        return {"tok_s": tok_s, "tokens": 512, "seconds": 512 / tok_s, "others_share": share}

    runs = {"8x64": {"one_request": [m(130, 0.01), m(30, 0.5), m(128, 0.02)],
                     "sequential": [m(100, 0.0), m(20, 0.4), m(104, 0.05)],
                     "concurrent": [m(120, 0.01), m(125, 0.01), m(25, 0.6)]}}
    d = rep.derive_throughput(runs)["8x64"]
    assert d["tok_s"] == {"one_request": 129, "sequential": 102, "concurrent": 122.5}
    assert round(d["one_vs_sequential"], 3) == round(129 / 102, 3)
    assert d["quiet"] == {f: 2 for f in rep.FORMS} and d["others_share"] == 0.05 and d["others_share_all"] == 0.6
    assert d["all_tok_s"]["one_request"] == 128


def test_carries_text_knows_completion_chat_and_responses_payloads():
    assert carries_text(json.dumps({"choices": [{"text": "a"}]}).encode())
    assert carries_text(json.dumps({"choices": [{"delta": {"content": "a"}}]}).encode())
    assert not carries_text(json.dumps({"choices": [{"delta": {"role": "assistant"}}]}).encode())
    assert carries_text(json.dumps({"type": "response.output_text.delta", "delta": "a"}).encode())
    assert not carries_text(json.dumps({"type": "response.created", "response": {}}).encode())
    assert not carries_text(b"[DONE]")


def test_usage_and_text_times_of_a_responses_stream():
    events = [json.dumps(e).encode() for e in (
        {"type": "response.created"}, {"type": "response.output_text.delta", "delta": "a"},
        {"type": "response.completed", "response": {"usage": {"output_tokens": 1}}})] + [b"[DONE]"]
    run = {"events": events, "times": [1.0, 2.0, 3.0, 4.0]}
    assert text_times(run) == [2.0] and final_usage(run) == {"output_tokens": 1}


class _ByteTokenizer:
    def encode(self, text: str, limit: int | None = None) -> list[int]:
        return list(text.encode())[:limit]


def test_make_inputs_are_different_and_about_the_size():
    texts = make_inputs(_ByteTokenizer(), 5, 64)
    assert len(set(texts)) == 5
    assert all(64 <= len(t) < 64 + 16 for t in texts)


def test_markdown_has_the_three_tables():
    d = {"tok_s": {"one_request": 300.0, "sequential": 100.0, "concurrent": 250.0}, "one_vs_sequential": 3.0,
         "concurrent_vs_sequential": 2.5, "others_share": 0.05, "others_share_all": 0.5, "tokens": {"one_request": 2112},
         "quiet": {f: 4 for f in rep.FORMS}, "runs": {f: 5 for f in rep.FORMS}}
    flood = {"alone_tok_s": 30.0, "flood_tok_s": 15.0, "ratio": 0.5, "window_s": 7.0, "alone_window_s": 6.0,
             "embedding_tok_s": 280.0,
             "all_covered": True, "others_share": 0.02, "quiet": 5, "runs": 5}
    over = {"chat_ms": 500.0, "responses_ms": 505.0, "ratio": 1.01, "diff_ms": 5.0, "same_tokens": True,
            "tokens": 16, "others_share": 0.01, "pairs": 19, "runs": 20}
    res = {"model": {"n_embd": 2048, "n_layer": 16, "ftype": "q4_0"}, "entry": {"slots": 8, "threads": 2},
           "reps": 5, "input_tokens": 64, "flood_inputs": 32,
           "throughput": {"derived": {"8x64": d, "32x64": d}}, "flood": {"derived": flood},
           "overhead": {"max_tokens": 16, "derived": {"streamed, store": over}}}
    text = rep.markdown(res)
    assert "| 32 x 66 | 300.0 | 100.0 | 250.0 | 3.00x | 2.50x | 4/5 | 5%, 50% |" in text
    assert "| 30.0 | 15.0 | 0.50x | 280 (300) | 5/5 | 2% |" in text
    assert "| streamed, store | 500 | 505 | 1.010x | +5.0 | yes (16) | 19/20 | 1% |" in text
