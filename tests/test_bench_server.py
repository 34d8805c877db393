"""The server load generator runs end to end on the CPU (tiny preset, in-process server, a few seconds)."""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def test_bench_server_smoke(monkeypatch):
    import bench_server

    monkeypatch.setattr(bench_server, "append_csv",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("a smoke run must not record")))
    (row,) = bench_server.main(["--smoke", "--duration", "2", "--rate", "4", "--concurrency", "4",
                                "--max-tokens", "6", "--record"])
    assert row["requests"] >= 1 and row["failed"] == 0, row
    assert row["requests_per_s"] > 0 and row["tokens_per_s"] > 0
    assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"]
    assert math.isnan(row["tpot_p50_ms"]) or 0 < row["tpot_p50_ms"] <= row["tpot_p99_ms"]
    assert row["mean_tokens"] <= 6
