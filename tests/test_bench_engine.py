"""The engine benchmark runs end to end on the CPU (tiny preset) and reports every stage and the floors."""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def test_bench_engine_smoke(monkeypatch):
    import bench_engine

    def refuse(*args, **kwargs):
        raise AssertionError("a smoke run must not record")

    monkeypatch.setattr(bench_engine, "append_csv", refuse)
    rows = bench_engine.main(["--smoke", "--record"])
    latency = [r for r in rows if r["case"] == "latency"]
    assert [r["frames"] for r in latency] == [8, 4]
    for row in latency:
        assert all(row[s] >= 0 for s in ("vit", "qformer", "connector", "prefill", "time_to_first_token"))
        assert row["ttft_floor_ms"] > 0 and row["ttft_over_floor"] > 0
    (throughput,) = [r for r in rows if r["case"] == "throughput"]
    assert throughput["videos"] == 4 and throughput["source"] == "files" and throughput["videos_per_s"] > 0
    assert math.isnan(throughput["vit"])


def test_bench_engine_smoke_serving_rows(monkeypatch):
    import bench_engine

    monkeypatch.setattr(bench_engine, "append_csv", lambda *a, **k: (_ for _ in ()).throw(AssertionError("record")))
    rows = bench_engine.main(["--smoke"])
    (poisson,) = [r for r in rows if r["case"] == "poisson"]
    assert poisson["requests"] == 6 and poisson["tokens_per_s"] > 0 and poisson["requests_per_s"] > 0
    assert poisson["mean_ttft_ms"] > 0
    shared = [r for r in rows if r["case"] == "shared-prefix"]     # it raises when the two ways' tokens differ
    assert [(r["mode"], r["batch"], r["requests"]) for r in shared] == [("prefix-cache", 4, 3), ("no-prefix-cache", 4, 3)]
    assert all(r["tokens_per_s"] > 0 and r["mean_ttft_ms"] > 0 for r in shared)
    decode = [r for r in rows if r["case"] == "decode"]
    assert [r["batch"] for r in decode] == [1, 4]
    for row in decode:
        assert row["ms_per_token"] > 0 and row["floor_ms"] > 0 and row["over_floor"] == row["ms_per_token"] / row["floor_ms"]
