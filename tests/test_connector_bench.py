"""The connector benchmark runs end to end in its smoke mode (tiny widths; the Triton interpreter on CPU)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def test_bench_connector_smoke(capsys):
    import bench_connector

    rows = bench_connector.main(["--smoke", "--repeats", "1"])
    assert [r["case"] for r in rows] == ["1x6", "2x3"]
    assert all(r["ms_fused"] > 0 and r["ms_reference"] > 0 and r["speedup"] > 0 for r in rows)
    # 1x6: L = 6, K = 5 -> 5 * 40 + 2; 2x3: L = 3, K = 2 per video -> 2 * (2 * 40 + 2).
    assert [r["tokens"] for r in rows] == [202, 164]
    # Launches and operators per call (bench/count_ops.py) do not grow with the number of videos.
    assert all(0 < r["launches"] <= 12 and 0 < r["work_ops"] <= 60 and r["ops"] >= r["work_ops"] for r in rows)
    assert rows[0]["launches"] == rows[1]["launches"] and rows[0]["work_ops"] == rows[1]["work_ops"]
    assert "ms_fused" in capsys.readouterr().out
