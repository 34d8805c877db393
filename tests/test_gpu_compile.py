"""Every Triton kernel compiles ahead of time for Hopper (sm_90) and Ampere (sm_80) with the launchers' own
options, without a GPU: GPU-only compile errors and register spills show up in CI, not first on a lent GPU.

The compilation runs in a subprocess because this test session has the Triton interpreter switched on."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "kernel_resources.py"
KERNELS = {"sq_norm", "knn_density", "knn_lists", "density_delta", "delta_near", "select_centers", "assign",
           "assign_min", "assign_tie", "pool_fwd", "pool_bwd", "paged_decode", "sq_dist_matrix", "sq_dot_split", "sq_dist_reduce", "spatial_merge",
           "pool_centre", "event_rho", "event_centres", "event_pool", "projector_inputs", "scatter_tokens"}


@pytest.fixture(scope="module")
def rows():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--json", "--arch", "90", "80", "--dtype", "bf16", "fp32"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_gpu_without_spills(rows, arch, dtype):
    mine = [r for r in rows if r["arch"] == arch and r["dtype"] == dtype]
    assert {r["kernel"] for r in mine} == KERNELS
    for row in mine:
        assert row["registers"] > 0, row
        assert row["stack"] == 0 and row["local"] == 0, f"{row['kernel']} spills on {arch} ({dtype}): {row}"


def test_distance_tiles_use_the_hopper_matrix_units(rows):
    hopper = {r["kernel"]: r for r in rows if r["arch"] == "sm_90" and r["dtype"] == "bf16"}
    for name in ("knn_density", "knn_lists", "density_delta", "delta_near", "assign", "assign_min", "assign_tie",
                 "sq_dist_matrix", "sq_dot_split", "spatial_merge"):
        assert hopper[name]["wgmma"] > 0, hopper[name]
