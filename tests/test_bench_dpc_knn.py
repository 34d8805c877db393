"""The DPC-KNN benchmark runs end to end (tiny shapes on CPU) and checks fused against reference itself."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def test_bench_dpc_knn_smoke(capsys):
    import bench_dpc_knn

    rows = bench_dpc_knn.main(["--smoke", "--no-compile", "--repeats", "1"])
    assert {r["case"] for r in rows} == {"spatial", "temporal"}
    assert all(r["ms"] > 0 for r in rows)
    assert "speedup" in capsys.readouterr().out
