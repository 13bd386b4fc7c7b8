"""benchmarks.engines / procmem / report_engines: the issue 10 engines sweep's pure logic and its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks import engines, procmem, report, report_engines
from benchmarks.clients import stream_rate
from benchmarks.run import parse_args

MODEL = {"n_embd": 2048, "n_layer": 16, "n_ctx": 2048, "ftype": "q4_0", "file_bytes": 500 * 2**20}


def level_run(tok_s: float, ttft: float, share: float = 0.01, rss: float = 100.0) -> dict:
    """One measured level of one engine, as engines.measure returns it."""
    return {"tok_s": tok_s, "requests": 2, "errors": [], "ttft": [ttft, ttft], "latency": [ttft + 1, ttft + 1],
            "stream_tok_s": [20.0, 30.0], "others": {"foreign_share": share},
            "memory": {"engine_pids": [1], "server_peak_mib": 100.0, "engine_peak_mib": rss,
                       "total_peak_mib": 100.0 + rss}}


def results(ggml8: float = 120.0, ttft8: float = 0.5) -> dict:
    """A whole engines section: two ctransformers shapes and the batched engine (p16 at 16 clients only)."""
    runs = {"ct-1x2": {k: [level_run(25.0, 0.3)] for k in engines.LEVELS},
            "ct-2x1": {k: [level_run(28.0 if k > 1 else 14.0, 0.6)] for k in engines.LEVELS},
            "ggml-p8": {k: [level_run(30.0 if k == 1 else ggml8, 0.3 if k == 1 else ttft8, 0.02, 2500.0)]
                        for k in engines.LEVELS},
            "ggml-p16": {16: [level_run(150.0, 0.9)]}}
    spec = engines.entries("m.bin", 2)
    budget = {"slots": 8, "weights_bytes": MODEL["file_bytes"], "kv_bytes": 2048 * 2**20, "kv_source": "formula",
              "budget_mib": 2548.0}
    return {"meta": {"mode": "quick", "date": "2026-12-01T00:00:00", "cpu": "cpu", "cpus": 2, "python": "3",
                     "versions": {"ctransformers": "0.2.27"}, "git_commit": "x", "git_dirty": False,
                     "load_average_start": [0.0]},
            "models": {"big": MODEL | {"n_vocab": 50400, "vocab_source": "default", "file": "m.bin"}},
            "contention": {"engines": {"seconds": 1, "busy_cpu_s": 1, "our_cpu_s": 1, "foreign_cpu_s": 0,
                                       "foreign_share": 0.0}},
            "engines": {"model": MODEL, "cpus": 2, "entries": spec, "tokens": 24, "per_client": 1,
                        "min_requests": 2, "reps": 1, "levels": engines.LEVELS, "memory_at": 8,
                        "batched": "ggml-p8", "wide": "ggml-p16", "ctransformers": ["ct-1x2", "ct-2x1"],
                        "memory_budget": {"ggml-p8": budget, "ggml-p16": budget | {"slots": 16}},
                        "derived": engines.derive(runs), "server_log_problems": []}}


def test_entries_give_every_engine_exactly_the_usable_cpus():
    spec = engines.entries("m.bin", 2)
    assert spec["ct-1x2"] | {} == {"id": "ct-1x2", "path": "m.bin", "engine": "ctransformers", "workers": 1,
                                   "threads": 2}
    assert (spec["ct-2x1"]["workers"], spec["ct-2x1"]["threads"]) == (2, 1)
    assert {k: (v["engine"], v.get("parallel"), v["threads"]) for k, v in spec.items() if "ggml" in k} == {
        "ggml-p8": ("ggml", 8, 2), "ggml-p16": ("ggml", 16, 2)}
    assert list(engines.entries("m.bin", 1)) == ["ct-1x1", "ggml-p8", "ggml-p16"]


def test_schedule_alternates_engines_and_runs_the_wide_engine_at_16_only():
    ids = ["a", "b", engines.WIDE]
    first, second = engines.schedule(ids, 0), engines.schedule(ids, 1)
    assert [k for k, _ in first] == engines.LEVELS
    assert first[0][1] == ["a", "b"] and first[1][1] == ["b", "a"]
    assert second[0][1] == ["b", "a"]
    assert first[-1] == (16, ["a", "b", engines.WIDE])


def test_derive_takes_medians_percentiles_worst_share_and_peak_memory():
    runs = {"e": {8: [level_run(10.0, 0.2, 0.01, 50.0), level_run(30.0, 0.4, 0.07, 80.0),
                      level_run(20.0, 0.3, 0.02, 60.0)]}}
    row = engines.derive(runs)["e"]["8"]
    assert row["tok_s"] == 20.0 and row["requests"] == 6
    assert row["ttft_p50_ms"] == pytest.approx(300.0)
    assert row["others_share"] == 0.07
    assert (row["engine_peak_mib"], row["total_peak_mib"]) == (80.0, 180.0)
    assert row["stream_tok_s_p50"] == pytest.approx(25.0)


def test_engine_targets_compare_the_batched_engine_with_itself_and_the_best_pool():
    by = report_engines.engine_targets(results())
    assert [round(t["value"], 3) for t in by] == [4.0, round(120 / 28, 3), 1.2, round(0.5 / 0.3, 3),
                                                   round(2600 / 2548, 3)]
    assert [t["pass"] for t in by] == [True, True, True, True, True]
    assert "ct-2x1 at 2 clients" in by[1]["target"]
    assert by[0]["others_share"] == 0.02
    slow = report_engines.engine_targets(results(ggml8=60.0, ttft8=1.0))
    assert [t["pass"] for t in slow] == [False, False, True, False, True]


def test_report_writes_the_engines_table_and_sweep_rows(tmp_path):
    text = report.write_all(results(), tmp_path)
    assert "| target | measured | goal | met | others' CPU |" in text
    assert text.count("| yes |") == 5
    md = (tmp_path / "results.md").read_text()
    assert "| ggml-p16 | 16 | 150.0 |" in md and "| ct-2x1 | 8 | 28.0 |" in md
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["engine_targets"]) == 5


def test_plots_show_both_engines(tmp_path):
    pytest.importorskip("matplotlib")
    res = results()
    report.write_all(res, tmp_path)
    assert res["plots"] == ["sweep_throughput.png", "sweep_ttft.png"]
    assert all((tmp_path / p).stat().st_size > 1000 for p in res["plots"])


def test_summarize_counts_only_the_busy_children():
    samples = [{1: 100, 2: 50, 3: 10, 4: 5}, {1: 120, 2: 70, 3: 20, 4: 5}]
    out = procmem.summarize(1, samples, {2: 3.0, 3: 1.0, 4: 0.1}, active=0.2)
    assert out["engine_pids"] == [2, 3]
    assert (out["server_peak_mib"], out["engine_peak_mib"], out["total_peak_mib"]) == (
        round(120 / 2**20, 1), round(90 / 2**20, 1), round(210 / 2**20, 1))


def test_sampler_finds_a_busy_child_and_its_memory():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)  # both past their start-up
        with procmem.ProcSampler(os.getpid(), interval=0.02) as s:
            time.sleep(0.5)
        assert busy.pid in s.result["engine_pids"] and idle.pid not in s.result["engine_pids"]
        assert s.result["samples"] >= 2 and s.result["server_peak_mib"] > 1 and s.result["engine_peak_mib"] > 1
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()


def test_stream_rate_is_the_decode_rate_after_the_first_text():
    assert stream_rate({"usage": {"completion_tokens": 11}, "ttft": 0.5, "total": 1.5}) == 10.0
    assert stream_rate({"usage": {"completion_tokens": 11}, "ttft": None, "total": 1.5}) is None


def test_cli_runs_only_the_engines_sweep_on_request():
    assert parse_args(["--quick", "--only", "engines"]).only == "engines"
    assert parse_args([]).only is None
    with pytest.raises(SystemExit):
        parse_args(["--only", "nothing"])


def test_the_join_target_compares_probe_ttfts_among_running_streams_with_alone():
    res = results()
    res["engines"]["join"] = {"background": 7, "probes": 3, "alone_p50_ms": 500.0, "joined_p50_ms": 800.0,
                              "ratio": 1.6, "others_share": 0.03}
    by = report_engines.engine_targets(res)
    row = next(t for t in by if "joining 7 running streams" in t["target"])
    assert (row["value"], row["op"], row["limit"], row["pass"], row["others_share"]) == (1.6, "<=", 2, True, 0.03)
    assert "800 vs 500 ms" in row["basis"]
    assert len(by) == 6 and by[-1]["target"].startswith("server + engine RSS")
