"""The fused spatial merger (kernels/spatial.py: both DPC-KNN layers, the modulation and G in one launch) against the
composed reference: two reference dpc_knn calls, the score Linear and the grouping of models/spatial_merger.py.
The parity and tie tests take the `device` fixture: CUDA in the GPU round (bench/gpu_session.sh), else the CPU."""
import pytest
import torch

import dynfocus_kernels as K
from dynfocus_kernels import reference as R
from dynfocus_kernels.common import gpu_tiles
from dynfocus_kernels.spatial import spatial_launch_config
from dynfocus_infer.config import ConnectorConfig
from dynfocus_infer.models.spatial_merger import SpatialMerger, group_prototypes
from kernel_utils import DTYPE_TOL, make_points, poison_empty


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_empty(monkeypatch)


def composed(x, weight, bias, centres, neighbours):
    (c1, c2), (k1, k2) = centres, neighbours
    first = R.dpc_knn(x, c1, k1, check=False)
    second = R.dpc_knn(first.prototypes, c2, k2, check=False)
    channel_mean = second.prototypes.mean(dim=-1).to(weight.dtype)
    modulation = torch.softmax(torch.nn.functional.linear(channel_mean, weight, bias), dim=-1)
    grouped = group_prototypes(first.prototypes, second.prototypes, second.assignment, modulation)
    return first, second, modulation, grouped


def score_linear(c2, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c2, c2, generator=g).to(dtype), torch.randn(c2, generator=g).to(dtype)


def assert_matches_composed(x, weight, bias, centres, neighbours, out=None, device="cpu"):
    """The kernel on `device` (CUDA in the GPU round) against the composed reference on the CPU."""
    if out is None:
        out = K.spatial_merge(x.to(device), weight.to(device), bias.to(device), centres, neighbours)
        out = type(out)(*(t.cpu() for t in out))
    first, second, modulation, grouped = composed(x, weight, bias, centres, neighbours)
    assert torch.equal(out.first_centers, first.centers)
    assert torch.equal(out.first_assignment, first.assignment)
    torch.testing.assert_close(out.rho, first.rho, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.delta, first.delta, atol=1e-5, rtol=1e-4)
    assert torch.equal(out.second_centers, second.centers)
    assert torch.equal(out.second_assignment, second.assignment)
    tol = DTYPE_TOL[x.dtype]
    torch.testing.assert_close(out.first, first.prototypes, atol=tol, rtol=tol)
    torch.testing.assert_close(out.second, second.prototypes, atol=tol, rtol=tol)
    torch.testing.assert_close(out.modulation, modulation, atol=tol, rtol=tol)
    torch.testing.assert_close(out.grouped, grouped, atol=tol, rtol=tol)
    assert out.grouped.dtype == x.dtype and out.modulation.dtype == weight.dtype
    assert out.bad.tolist() == [0] * x.shape[0]
    return out


# (T, N, C, dtype, centres, neighbours): the default layers, odd sizes, N past one 128-row tile (and one 256-wide
# interpreter row block), more frames than the interpreter's 4 programs, k past the set, c2 = c1, every dtype.
CASES = [(3, 64, 32, torch.float32, (16, 6), (8, 3)), (5, 49, 33, torch.float32, (7, 3), (4, 2)),
         (2, 256, 1408, torch.bfloat16, (16, 6), (8, 3)), (3, 20, 16, torch.float16, (5, 5), (3, 9)),
         (9, 300, 24, torch.float32, (16, 6), (8, 3)), (2, 16, 1, torch.float32, (16, 1), (40, 1)),
         (4, 37, 70, torch.bfloat16, (33, 7), (6, 5))]


@pytest.mark.parametrize("T,N,C,dtype,centres,neighbours", CASES)
def test_spatial_merge_matches_the_composed_path(T, N, C, dtype, centres, neighbours, device):
    x = make_points(T, N, C, dtype, seed=T * 31 + N + C)
    assert_matches_composed(x, *score_linear(centres[1], dtype, seed=N), centres, neighbours, device=device)


def test_fp32_score_linear_with_bf16_points(device):
    """The score Linear may hold another dtype than the points (rounded where the composed path rounds)."""
    x = make_points(3, 64, 40, torch.bfloat16, seed=11)
    assert_matches_composed(x, *score_linear(6, torch.float32, seed=3), (16, 6), (8, 3), device=device)


def test_ties_identical_and_duplicated_patches(device):
    """A static frame (every patch equal) and a frame of a few repeated patches: distances snap to 0 and the index
    rule decides, exactly as in the reference."""
    g = torch.Generator().manual_seed(5)
    static = torch.randn(1, 1, 48, generator=g).expand(1, 64, 48)
    repeated = torch.randn(1, 4, 48, generator=g).repeat(1, 16, 1)
    x = torch.cat([static, repeated, make_points(1, 64, 48, torch.float32, seed=9)]).contiguous()
    out = assert_matches_composed(x, *score_linear(6, torch.float32, seed=1), (16, 6), (8, 3), device=device)
    assert out.first_centers[0].tolist() == list(range(16))       # all tied: rho 1, delta 0, lowest index first
    assert torch.equal(out.rho[0], torch.ones(64))


def test_non_contiguous_points(device):
    x = make_points(3, 40, 64, torch.float32, seed=2)
    weight, bias = score_linear(4, torch.float32, seed=2)
    strided = x.to(device)[:, :, ::2]
    assert not strided.is_contiguous()
    out = K.spatial_merge(strided, weight.to(device), bias.to(device), (10, 4), (5, 2))
    assert_matches_composed(x[:, :, ::2], weight, bias, (10, 4), (5, 2), out=type(out)(*(t.cpu() for t in out)))


def test_gpu_launch_configuration():
    """The GPU's programs, 64-row Gram tiles and 32-channel blocks, run by the interpreter: a set of three Gram
    tiles with a ragged last one, channel remainders, several frames per program."""
    x = make_points(6, 130, 70, torch.float32, seed=4)
    weight, bias = score_linear(6, torch.float32, seed=4)
    with gpu_tiles():
        cfg = spatial_launch_config(6, 130, 70, torch.float32, x.device)
        assert (cfg["BLOCK_G"], cfg["BLOCK_C"], cfg["BLOCK_R"], cfg["BLOCK_P"]) == (64, 32, 16, 16)
        out = K.spatial_merge(x, weight, bias)
    assert_matches_composed(x, weight, bias, (16, 6), (8, 3), out=out)


def test_a_non_finite_frame_is_flagged_and_spares_the_others(device):
    x = make_points(4, 64, 32, torch.float32, seed=6)
    x[1, 5, 3] = float("nan")
    x[3, 0, 0] = float("inf")
    weight, bias = score_linear(6, torch.float32, seed=6)
    out = K.spatial_merge(x.to(device), weight.to(device), bias.to(device), check=False)
    out = type(out)(*(t.cpu() for t in out))
    assert out.bad.tolist() == [0, 1, 0, 1]
    # The flagged frames' clustering is meaningless but every id stays in range (the training path gathers with them).
    for ids, bound in ((out.first_centers, 64), (out.first_assignment, 16), (out.second_centers, 16),
                       (out.second_assignment, 6)):
        assert ((ids >= 0) & (ids < bound)).all()
    for t in (0, 2):
        first, second, modulation, grouped = composed(x[t:t + 1], weight, bias, (16, 6), (8, 3))
        assert torch.equal(out.first_assignment[t:t + 1], first.assignment)
        torch.testing.assert_close(out.grouped[t:t + 1], grouped, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="non-finite"):
        K.spatial_merge(x, weight, bias)


@pytest.mark.parametrize("centres,shape,message", [
    ((16, 17), (17, 17), "second"), ((65, 6), (6, 6), "65"), ((16, 6), (5, 6), "score Linear")])
def test_bad_arguments_are_named(centres, shape, message):
    x = make_points(2, 80, 8, torch.float32, seed=1)
    with pytest.raises(ValueError, match=message):
        K.spatial_merge(x, torch.zeros(shape), torch.zeros(shape[0]), centres, (8, 3))


def test_the_op_passes_opcheck():
    x = make_points(3, 24, 16, torch.float32, seed=8)
    weight, bias = score_linear(3, torch.float32, seed=8)
    from dynfocus_kernels.library import spatial_merge_op

    torch.library.opcheck(spatial_merge_op, (x, weight, bias, 6, 3, 4, 2))


def merger(dtype=torch.float32, backend="auto"):
    config = ConnectorConfig(vision_width=24, llm_width=32, qformer_width=16, patch_grid=8)
    torch.manual_seed(0)
    return SpatialMerger(config, cluster_backend=backend).to(dtype)


def test_the_merger_runs_one_launch_and_equals_the_reference_backend():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from count_ops import count_calls

    fused, reference = merger(), merger(backend="reference")
    x = make_points(7, 64, 24, torch.float32, seed=12)
    with torch.no_grad():
        out, counts = count_calls(lambda: fused.prototypes(x))
        expected = reference.prototypes(x)
    assert counts.launches == 1 and dict(counts.by_kernel) == {"_spatial_merge_kernel": 1}
    torch.testing.assert_close(out.grouped, expected.grouped, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.modulation, expected.modulation, atol=1e-6, rtol=1e-5)


def test_training_gradients_through_the_kernels_assignments():
    """With a gradient wanted, the kernel's assignments are pooled by the differentiable ops: outputs and gradients
    (patch tokens and merge.score) equal the reference backend's."""
    fused, reference = merger(), merger(backend="reference")
    x = make_points(3, 64, 24, torch.float32, seed=13)
    grads = []
    for module in (fused, reference):
        points = x.clone().requires_grad_()
        out = module.prototypes(points)
        (out.grouped * torch.linspace(-1, 1, out.grouped.numel()).view_as(out.grouped)).sum().backward()
        grads.append((out.grouped.detach(), points.grad, module.score.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads[0][1].abs().sum() > 0 and grads[0][2].abs().sum() > 0
