"""The DPC-KNN benchmark runs end to end (tiny shapes on CPU) and checks fused against reference itself."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def test_bench_dpc_knn_smoke(capsys):
    import bench_dpc_knn

    rows = bench_dpc_knn.main(["--smoke", "--no-compile", "--repeats", "1"])
    assert {r["case"] for r in rows} == {"spatial", "temporal"}
    assert all(r["ms"] > 0 and r["x_mem"] > 0 for r in rows)
    fused = [r for r in rows if r["impl"] == "fused-spatial"]
    assert len(fused) == 1 and fused[0]["launches"] == 1 and fused[0]["agree"] >= 0.9
    assert "speedup" in capsys.readouterr().out


def test_cpu_runs_record_nothing(monkeypatch, capsys):
    """--record keeps full-size GPU runs only: a CPU smoke run must not append rows to bench/results."""
    import bench_connector
    import bench_dpc_knn
    import bench_topk_mask

    def fail(*args, **kwargs):
        raise AssertionError("a CPU run appended rows")

    for module in (bench_dpc_knn, bench_topk_mask, bench_connector):
        monkeypatch.setattr(module, "append_csv", fail)
    bench_dpc_knn.main(["--smoke", "--no-compile", "--repeats", "1", "--record"])
    bench_topk_mask.main(["--record", "--repeats", "1", "--batch-sizes", "2", "--shapes", "5x9"])
    bench_connector.main(["--smoke", "--repeats", "1", "--record"])
    assert capsys.readouterr().out.count("nothing recorded") == 3
