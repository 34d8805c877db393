"""The token-count profiler (bench/profile_tokens.py) in smoke mode, and the plots (bench/plots.py) rendered from its
rows, from the DPC-KNN benchmark's smoke rows, and from recorded CSVs, all into tmp_path."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_dpc_knn  # noqa: E402
import plots  # noqa: E402
import profile_tokens  # noqa: E402
from ceilings import measure_ceilings  # noqa: E402
from common import append_csv  # noqa: E402
from dynfocus_infer.models.baselines import DYNFOCUS_GRID, dynfocus_name  # noqa: E402

FRAMES, BATCHES, CONTEXT = (5, 12, 30), (1, 2), 700
BASELINES = {"full", "pool-4x4", "llama-vid", "uniform-8"} | {dynfocus_name(L, r) for L, r in DYNFOCUS_GRID}
LLM_TIMINGS = ("prefill_ms", "ttft_ms", "decode_ms_per_token", "videos_per_s")


@pytest.fixture(scope="module")
def smoke_rows():
    argv = ["--smoke", "--frames", *map(str, FRAMES), "--batches", *map(str, BATCHES), "--context", str(CONTEXT)]
    return profile_tokens.main(argv)


@pytest.fixture(scope="module")
def dpc_rows():
    return bench_dpc_knn.main(["--smoke", "--no-compile"])


def test_smoke_run_has_a_row_for_every_baseline_frames_and_batch(smoke_rows):
    keys = [(r["baseline"], r["frames"], r["batch"]) for r in smoke_rows]
    assert len(keys) == len(set(keys))
    assert set(keys) == {(b, t, n) for b in BASELINES for t in FRAMES for n in BATCHES}
    assert all(list(r) == profile_tokens.COLUMNS for r in smoke_rows)


def test_rows_that_fit_have_positive_times_and_consistent_totals(smoke_rows):
    fitting = [r for r in smoke_rows if r["status"] == "ok"]
    assert len(fitting) > len(smoke_rows) // 2
    for r in fitting:
        for column in ("vit_ms", "connector_ms") + LLM_TIMINGS:
            assert r[column] > 0 and math.isfinite(r[column]), (r["baseline"], r["frames"], column)
        assert r["ttft_ms"] == pytest.approx(r["vit_ms"] + r["qformer_ms"] + r["connector_ms"] + r["prefill_ms"])
        batch_ms = r["ttft_ms"] + (profile_tokens.SMOKE["answer_tokens"] - 1) * r["decode_ms_per_token"]
        assert r["videos_per_s"] == pytest.approx(r["batch"] / batch_ms * 1e3)
        assert (r["qformer_ms"] > 0) == (r["baseline"] == "llama-vid" or r["baseline"].startswith("dynfocus"))
    # Uniform-8 reads only min(8, T) frames through the ViT; the other encoders read all T.
    vit = {(r["baseline"], r["frames"], r["batch"]): r["vit_ms"] for r in smoke_rows}
    assert vit[("uniform-8", 30, 1)] == pytest.approx(vit[("full", 30, 1)] * 8 / 30)
    assert vit[("uniform-8", 5, 2)] == pytest.approx(vit[("full", 5, 2)])


def test_prompts_over_the_context_are_reported_not_truncated(smoke_rows):
    answer = profile_tokens.SMOKE["answer_tokens"]
    over = [r for r in smoke_rows if r["prompt_tokens"] + answer > CONTEXT]
    # 64 tokens per frame at the tiny grid (8 x 8): full from T = 12; DynFocus (L25, 0.8) at T = 30 has 820.
    assert {(r["baseline"], r["frames"]) for r in over} >= {("full", 12), ("full", 30), ("dynfocus-L25-r0.8", 30)}
    for r in smoke_rows:
        assert r["context"] == CONTEXT
        assert (r["status"] == "exceeds context") == (r in over)
        if r in over:
            assert all(math.isnan(r[c]) for c in LLM_TIMINGS)
            assert r["connector_ms"] > 0  # the encoder still runs and reports its cost
    full_12 = next(r for r in smoke_rows if (r["baseline"], r["frames"], r["batch"]) == ("full", 12, 1))
    assert full_12["visual_tokens"] == 12 * 64 and full_12["status"] == "exceeds context"


def test_visual_tokens_and_kv_cache_are_exact(smoke_rows):
    tiny_llm = dict(num_layers=2, num_kv_heads=2, head_dim=16)  # the "tiny" preset's LLM, fp32
    per_position = tiny_llm["num_layers"] * 2 * tiny_llm["num_kv_heads"] * tiny_llm["head_dim"] * 4
    text_tokens = {r["prompt_tokens"] - r["visual_tokens"] for r in smoke_rows}
    assert len(text_tokens) == 1 and text_tokens.pop() > 5
    for r in smoke_rows:
        t = r["frames"]
        expected = {"full": 64 * t, "pool-4x4": 16 * t, "llama-vid": 2 * t, "uniform-8": 64 * min(8, t)}
        if r["baseline"] in expected:
            assert r["visual_tokens"] == expected[r["baseline"]]
        seq = r["prompt_tokens"] + profile_tokens.SMOKE["answer_tokens"]
        assert r["kv_cache_mb"] * 2 ** 20 == pytest.approx(per_position * seq * r["batch"])
    paper = {r["frames"]: r["visual_tokens"] for r in smoke_rows if r["baseline"] == "dynfocus-L25-r0.8"}
    assert paper == {5: 4 * 40 + 2, 12: 10 * 40 + 2 * 2, 30: 20 * 40 + 10 * 2}


def test_kv_cache_formula_at_vicuna_7b():
    from dynfocus_infer.config import LlamaConfig

    # 32 layers x 2 x 32 heads x 128 x 2 bytes = 0.5 MB per position: 4096 positions = 2048 MB.
    assert profile_tokens.kv_cache_mb(LlamaConfig(), 4096, 1, 2) == 2048.0
    assert profile_tokens.kv_cache_mb(LlamaConfig(), 1000, 8, 2) == 8 * 500.0


def test_smoke_run_records_nothing(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise AssertionError("a smoke run must not append rows")

    monkeypatch.setattr(profile_tokens, "append_csv", fail)
    rows = profile_tokens.main(["--smoke", "--record", "--frames", "3", "--batches", "1",
                                "--baselines", "full", "dynfocus-L25-r0.8"])
    assert [r["baseline"] for r in rows] == ["full", "dynfocus-L25-r0.8"]
    assert "nothing recorded" in capsys.readouterr().out


def test_out_of_memory_is_reported_and_does_not_hide_exceeded_context(monkeypatch):
    class NoRoomCache:
        @staticmethod
        def for_model(*args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(profile_tokens, "KVCache", NoRoomCache)
    rows = profile_tokens.main(["--smoke", "--frames", "3", "20", "--batches", "1", "--context", "700",
                                "--baselines", "full", "llama-vid"])
    status = {(r["baseline"], r["frames"]): r["status"] for r in rows}
    assert status == {("full", 3): "out of memory", ("llama-vid", 3): "out of memory",
                      ("full", 20): "exceeds context", ("llama-vid", 20): "out of memory"}
    for r in rows:
        assert r["connector_ms"] > 0 and all(math.isnan(r[c]) for c in LLM_TIMINGS)


def assert_png(path: Path, min_bytes: int = 8_000):
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > min_bytes, f"{path.name} is only {path.stat().st_size} bytes"


def test_every_plot_renders_from_smoke_rows(smoke_rows, dpc_rows, tmp_path):
    written = plots.render_profile(smoke_rows, tmp_path)
    written.append(plots.plot_roofline(dpc_rows, tmp_path, measure_ceilings(torch.device("cpu"))))
    assert [p.name for p in written] == ["tokens_vs_frames.png", "ttft_vs_frames.png", "throughput_vs_batch.png",
                                         "roofline_dpc_knn.png"]
    for path in written:
        assert path.parent == tmp_path
        assert_png(path)
    with pytest.raises(ValueError, match="ceiling"):
        plots.plot_roofline(dpc_rows, tmp_path)


def test_plots_from_recorded_csvs_use_the_latest_run(smoke_rows, dpc_rows, tmp_path):
    results = tmp_path / "results"
    old = [dict(device="old", date="2020-01-01T00:00:00Z", **r) for r in smoke_rows[:3]]
    new = [dict(device="cpu", date="2030-01-01T00:00:00Z", **r) for r in smoke_rows]
    append_csv("profile_tokens", old + new, results_dir=results)
    ceilings = dict(ceiling_tflops=0.05, ceiling_gbps=5.0)
    append_csv("dpc_knn", [dict(date="2030-01-01T00:00:00Z", **ceilings, **r) for r in dpc_rows],
               results_dir=results)
    parsed = plots.read_rows(results / "profile_tokens.csv")
    latest = plots.latest_run(parsed)
    assert len(latest) == len(smoke_rows) and all(r["device"] == "cpu" for r in latest)
    assert latest[0]["frames"] == smoke_rows[0]["frames"] and isinstance(latest[0]["ttft_ms"], float)
    written = plots.main(["--results", str(results), "--out", str(tmp_path / "plots")])
    assert sorted(p.name for p in written) == ["roofline_dpc_knn.png", "throughput_vs_batch.png",
                                              "tokens_vs_frames.png", "ttft_vs_frames.png"]
    for path in written:
        assert_png(path)


def test_counts_mode_gives_exact_budgets_at_paper_sizes_without_a_device(monkeypatch, tmp_path):
    recorded = {}

    def record(name, rows):
        recorded[name] = list(rows)
        return tmp_path / f"{name}.csv"

    monkeypatch.setattr(profile_tokens, "append_csv", record)
    rows = profile_tokens.main(["--counts", "--record", "--frames", "16", "200", "--batches", "1", "8"])
    assert set(recorded) == {"token_counts"} and len(recorded["token_counts"]) == len(rows)
    assert all(r["device"] == "none (exact counts)" and r["commit"] and r["date"] for r in recorded["token_counts"])
    assert all(list(r) == profile_tokens.COUNT_COLUMNS for r in rows)
    by_key = {(r["baseline"], r["frames"], r["batch"]): r for r in rows}
    assert len(by_key) == len(rows) == len(BASELINES) * 2 * 2
    # Paper sizes: 16 x 16 patches per frame, L = 25 events, K/L = 0.8, 40 tokens per keyframe, 2 per other frame.
    expected = {"full": lambda t: 256 * t, "pool-4x4": lambda t: 16 * t, "llama-vid": lambda t: 2 * t,
                "uniform-8": lambda t: 256 * min(8, t),
                "dynfocus-L25-r0.8": lambda t: 40 * round(0.8 * min(25, t)) + 2 * (t - round(0.8 * min(25, t)))}
    text = {r["prompt_tokens"] - r["visual_tokens"] for r in rows}
    assert len(text) == 1
    text = text.pop()
    # The random 7B build tokenizes UTF-8 bytes: BOS + the rendered Vicuna prompt, question included.
    assert text > len(profile_tokens.QUESTION)
    for (name, t, batch), r in by_key.items():
        if name in expected:
            assert r["visual_tokens"] == expected[name](t), (name, t)
        assert r["context"] == 4096
        fits = r["prompt_tokens"] + profile_tokens.COUNTS["answer_tokens"] <= 4096
        assert r["status"] == ("ok" if fits else "exceeds context")
        # Vicuna-7B in bf16: 32 layers x 2 x 32 heads x 128 x 2 bytes = 0.5 MB per position.
        assert r["kv_cache_mb"] == 0.5 * (r["prompt_tokens"] + profile_tokens.COUNTS["answer_tokens"]) * batch
    assert by_key[("full", 16, 1)]["status"] == "exceeds context"
    assert by_key[("dynfocus-L25-r0.8", 200, 8)]["status"] == "ok"


def test_counts_rows_match_the_smoke_profilers_size_columns():
    """The same budget_row serves both modes: at the tiny preset's sizes, --counts repeats the smoke run's sizes."""
    argv = ["--frames", "5", "12", "--batches", "1", "2", "--context", "700", "--model", "tiny", "--answer-tokens", "8"]
    counts = profile_tokens.main(["--counts", *argv])
    smoke = profile_tokens.main(["--smoke", *argv, "--baselines", "full", "llama-vid", "dynfocus-L25-r0.8"])
    smoke_sizes = {(r["baseline"], r["frames"], r["batch"]): r for r in smoke}
    matched = 0
    for r in counts:
        twin = smoke_sizes.get((r["baseline"], r["frames"], r["batch"]))
        if twin is None:
            continue
        matched += 1
        for column in ("status", "visual_tokens", "prompt_tokens", "context"):
            assert r[column] == twin[column], (r["baseline"], r["frames"], column)
        # --counts sizes the KV cache in bf16, the CPU smoke run holds it in fp32: exactly half.
        assert r["kv_cache_mb"] * 2 == pytest.approx(twin["kv_cache_mb"])
    assert matched == 3 * 2 * 2


def test_counts_and_smoke_are_exclusive():
    with pytest.raises(SystemExit):
        profile_tokens.parse_args(["--counts", "--smoke"])


def test_tokens_plot_prefers_the_exact_counts(smoke_rows, tmp_path):
    results = tmp_path / "results"
    counts = profile_tokens.main(["--counts", "--frames", "8", "400"])
    append_csv("token_counts", [dict(date="2030-01-01T00:00:00Z", **r) for r in counts], results_dir=results)
    append_csv("profile_tokens", [dict(date="2030-01-01T00:00:00Z", **r) for r in smoke_rows], results_dir=results)
    calls = []
    original = plots.plot_tokens_vs_frames
    monkey_rows = lambda rows, out: calls.append(rows) or original(rows, out)  # noqa: E731
    plots.plot_tokens_vs_frames = monkey_rows
    try:
        written = plots.main(["--results", str(results), "--out", str(tmp_path / "plots")])
    finally:
        plots.plot_tokens_vs_frames = original
    assert len(calls) == 1 and {r["frames"] for r in calls[0]} == {8, 400}
    assert sorted(p.name for p in written) == ["throughput_vs_batch.png", "tokens_vs_frames.png",
                                              "ttft_vs_frames.png"]
    for path in written:
        assert_png(path)


def test_readme_budget_table_matches_the_counts_mode():
    """The README's token / KV-cache table is what --counts computes at the current code (docs match the code)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = [line for line in readme.splitlines() if line.startswith("| ") and " MB" in line]
    assert len(table) >= 5
    rows = profile_tokens.main(["--counts", "--frames", "16", "32", "64", "200", "--batches", "1"])
    by_key = {(r["baseline"], r["frames"]): r for r in rows}
    for line in table:
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        name = cells[0]
        for frames, cell in zip((16, 32, 64, 200), cells[1:]):
            r = by_key[(name, frames)]
            over = " (over)" if r["status"] != "ok" else ""
            assert cell == f"{r['visual_tokens']:,} / {r['kv_cache_mb']:,.0f} MB{over}", (name, frames)


def test_latest_run_joins_a_run_split_over_calls_and_keeps_each_cases_last_row():
    def row(device, commit, date, baseline, frames, value):
        return dict(device=device, commit=commit, date=date, baseline=baseline, frames=frames, batch=1, ttft_ms=value)

    rows = [row("H100", "aaa", "d1", "full", 16, 1.0),          # an older commit
            row("H100", "bbb", "d2", "full", 16, 2.0),          # call 1 of the latest run
            row("H100", "bbb", "d2", "llama-vid", 16, 3.0),
            row("H100", "bbb", "d3", "full", 32, 4.0),          # call 2, another date
            row("H100", "bbb", "d4", "full", 16, 5.0)]          # a case run again: the last row stands
    latest = plots.latest_run(rows)
    assert [(r["baseline"], r["frames"], r["ttft_ms"]) for r in latest] == [
        ("llama-vid", 16, 3.0), ("full", 32, 4.0), ("full", 16, 5.0)]
    dpc = [dict(device="H100", commit="bbb", case="temporal", shape="1x200x22528", impl=impl, ms=ms)
           for impl, ms in (("fused", 1.0), ("reference", 9.0), ("fused", 2.0))]
    assert [(r["impl"], r["ms"]) for r in plots.latest_run(dpc, plots.DPC_KEY)] == [("reference", 9.0), ("fused", 2.0)]


def test_a_failing_case_is_recorded_as_an_error_and_the_others_still_run(monkeypatch, tmp_path):
    original = profile_tokens.Profiler._run

    def broken_for_llama_vid(self, encoder, *args):
        if encoder.name == "llama-vid":
            raise RuntimeError("simulated kernel failure\nsecond line")
        return original(self, encoder, *args)

    monkeypatch.setattr(profile_tokens.Profiler, "_run", broken_for_llama_vid)
    rows = profile_tokens.main(["--smoke", "--frames", "3", "--batches", "1", "--baselines", "full", "llama-vid"])
    status = {r["baseline"]: r["status"] for r in rows}
    assert status == {"full": "ok", "llama-vid": "error: RuntimeError: simulated kernel failure"}


def test_recording_appends_each_row_as_its_case_ends(monkeypatch, tmp_path):
    """A run cut short (a device call's time limit) keeps the rows of the cases that ended."""
    appended = []
    monkeypatch.setattr(profile_tokens, "append_csv", lambda name, rows: appended.append(list(rows)) or tmp_path)
    monkeypatch.setenv("DYNFOCUS_COMMIT", "abc1234")
    original = profile_tokens.Profiler.case
    calls = []

    def case(self, *args):
        calls.append(len(appended))  # rows appended before this case began
        return original(self, *args)

    monkeypatch.setattr(profile_tokens.Profiler, "case", case)
    args = profile_tokens.parse_args(["--frames", "3", "5", "--batches", "1", "--baselines", "full", "llama-vid"])
    loaded = profile_tokens.load_model("tiny", device="cpu", dtype=torch.float32, cluster_backend="reference")
    settings = dict(profile_tokens.SMOKE, frames=(3, 5), batches=(1,))
    profiler = profile_tokens.Profiler(loaded, torch.device("cpu"), settings, None)
    recorder = profile_tokens.row_recorder(dict(device="cpu", model="tiny", dtype="float32", answer_tokens=8))
    rows = profile_tokens.profile(profiler, profile_tokens.select_baselines(loaded.model.connector, args), recorder)
    assert calls == [0, 1, 2, 3] and len(appended) == 4 and all(len(batch) == 1 for batch in appended)
    assert [a[0]["baseline"] for a in appended] == [r["baseline"] for r in rows]
    assert all(a[0]["commit"] == "abc1234" for a in appended)


def test_plots_with_a_header_only_profile_csv_draw_the_counts_and_say_so(tmp_path, capsys):
    results = tmp_path / "results"
    counts = profile_tokens.main(["--counts", "--frames", "8", "16"])
    append_csv("token_counts", [dict(date="2030-01-01T00:00:00Z", **r) for r in counts], results_dir=results)
    (results / "profile_tokens.csv").write_text(",".join(["device", "commit", "date"] + profile_tokens.COLUMNS) + "\n")
    written = plots.main(["--results", str(results), "--out", str(tmp_path / "plots")])
    assert [p.name for p in written] == ["tokens_vs_frames.png"]
    assert "holds no rows" in capsys.readouterr().out
