"""DPC-KNN v2 (kernels/gram.py, issue 12): the distance matrix once, then density, delta and assignment from it,
against dynfocus_kernels.reference and v1, whole and in row panels, with the GPU's tiles and channel splits too;
outputs NaN-poisoned."""
import pytest
import torch

import dynfocus_kernels as K
from dynfocus_kernels import reference as R
from dynfocus_kernels import gram
from dynfocus_kernels.common import EMULATED_SMS, gpu_tiles
from dynfocus_kernels.distance import prepare_points
from dynfocus_kernels.gram import (channel_splits, density_delta_gram, dpc_knn_gram, gram_config,
                                   launch_sq_dist_matrix, sq_dist_matrix)
from kernel_utils import DPC_KNN_CASES, DTYPE_TOL, make_points, poison_empty, ragged_lengths

SIZES = [(1, 1), (2, 33), (7, 1408), (63, 33), (257, 33), (257, 1408)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_empty(monkeypatch)


def _cases():
    for N, C in SIZES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            if N * C > 63 * 1408 and dtype != torch.float32:
                continue
            yield pytest.param(N, C, dtype, id=f"N{N}-C{C}-{str(dtype)[6:]}")


@pytest.mark.parametrize("N,C,dtype", list(_cases()))
def test_distance_matrix_matches_reference_and_is_inf_past_valid(N, C, dtype, device):
    B = 3
    x = make_points(B, N, C, dtype, seed=N * 7 + C, device=device)
    lens = ragged_lengths(B, N, seed=N, device=device)
    d = sq_dist_matrix(x, valid_len=lens)
    ref = R.pairwise_sq_dist(x, lens)
    valid = torch.arange(N, device=device)[None, :] < lens[:, None]
    pair = valid[:, :, None] & valid[:, None, :]
    torch.testing.assert_close(d[pair], ref[pair], atol=1e-5, rtol=1e-4)
    assert torch.isinf(d[~pair]).all()
    assert torch.equal(d, d.transpose(1, 2)), "one tile computes both (i, j) and (j, i)"
    assert (torch.diagonal(d, dim1=1, dim2=2)[valid] == 0).all()


@pytest.mark.parametrize("N,C,dtype", list(_cases()))
def test_density_and_delta_match_reference(N, C, dtype, device):
    B, k = 3, 5
    x = make_points(B, N, C, dtype, seed=N * 131 + C, device=device)
    lens = ragged_lengths(B, N, seed=N + C, device=device)
    rho, delta = density_delta_gram(x, k, valid_len=lens)
    torch.testing.assert_close(rho, R.knn_density(x, k, valid_len=lens), atol=1e-6, rtol=1e-5)
    # The reference's delta from the same rho: the comparison checks delta, not rounding-level density ties.
    torch.testing.assert_close(delta, R.density_delta(x, rho, valid_len=lens), atol=1e-5, rtol=1e-4)
    pad = torch.arange(N, device=device)[None, :] >= lens[:, None]
    assert (rho[pad] == 0).all() and (delta[pad] == 0).all()
    assert not rho.isnan().any() and not delta.isnan().any()


@pytest.mark.parametrize("N,C,dtype", [(2, 33, torch.float32), (63, 1408, torch.bfloat16), (257, 33, torch.float32),
                                       (130, 40, torch.float16)])
def test_v1_kernels_reading_the_distances_give_what_they_compute(N, C, dtype, device):
    # knn_density / density_delta with distances=D (v2) against the same kernels computing their tiles (v1).
    B, k = 3, 5
    x = make_points(B, N, C, dtype, seed=N + C, device=device)
    lens = ragged_lengths(B, N, seed=N * 5, device=device)
    d = sq_dist_matrix(x, valid_len=lens)
    d = torch.where(torch.isinf(d), float("nan"), d)  # entries past valid_len must never be read
    rho = K.knn_density(x, k, valid_len=lens, distances=d)
    torch.testing.assert_close(rho, K.knn_density(x, k, valid_len=lens), atol=1e-6, rtol=1e-5)
    delta = K.density_delta(x, rho, valid_len=lens, distances=d)
    torch.testing.assert_close(delta, K.density_delta(x, rho, valid_len=lens), atol=1e-5, rtol=1e-4)
    assert not rho.isnan().any() and not delta.isnan().any()


@pytest.mark.parametrize("rows", [1, 50, 256])
def test_row_panels_give_what_the_whole_matrix_gives(rows, device):
    # Panels of `rows` rows (max_bytes = B x rows x N x 4); ragged lengths leave whole panels past some sets' ends.
    B, N, C, k = 3, 257, 40, 5
    x = make_points(B, N, C, torch.float32, seed=rows, device=device)
    lens = torch.tensor([N, 120, 3], device=device)
    whole = dpc_knn_gram(x, 3, k, valid_len=lens)
    rho, delta = density_delta_gram(x, k, valid_len=lens, max_bytes=B * rows * N * 4)
    torch.testing.assert_close(rho, whole.rho, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(delta, whole.delta, atol=1e-6, rtol=1e-5)
    paneled = dpc_knn_gram(x, 3, k, valid_len=lens, max_bytes=B * rows * N * 4)
    assert torch.equal(paneled.centers, whole.centers) and torch.equal(paneled.assignment, whole.assignment)


@pytest.mark.parametrize("weight", ["uniform", "rho_delta"])
@pytest.mark.parametrize("N,C,L,k,dtype", DPC_KNN_CASES)
def test_dpc_knn_matches_reference_and_v1(N, C, L, k, dtype, weight, device):
    B = 3
    x = make_points(B, N, C, dtype, seed=N + 1000 * L, device=device)
    lens = ragged_lengths(B, N, seed=N, minimum=L, device=device)
    res = dpc_knn_gram(x, L, k, weight=weight, valid_len=lens)
    ref = R.dpc_knn(x, L, k, weight=weight, valid_len=lens)
    v1 = K.dpc_knn(x, L, k, weight=weight, valid_len=lens)
    torch.testing.assert_close(res.rho, ref.rho, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.delta, ref.delta, atol=1e-5, rtol=1e-4)
    for other in (ref, v1):
        assert torch.equal(res.centers, other.centers) and torch.equal(res.assignment, other.assignment)
    tol = DTYPE_TOL[dtype]
    assert res.prototypes.dtype == dtype and res.prototypes.shape == (B, L, C)
    torch.testing.assert_close(res.prototypes, ref.prototypes, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_follow_the_index_rule(dtype, device):
    # Every point twice: densities tie in pairs and the lower-index copy ranks first; a static video (one point
    # repeated) is all ties; 1-D points equidistant from two centres go to the lower rank.
    base = make_points(2, 20, 33, dtype, seed=11, device=device)
    twice = torch.cat([base, base], dim=1)
    res, ref = dpc_knn_gram(twice, 6, 3), R.dpc_knn(twice, 6, 3)
    assert torch.equal(res.centers, ref.centers) and torch.equal(res.assignment, ref.assignment)
    assert (res.centers < 20).all()
    static = base[:, :1].expand(2, 30, 33).contiguous()
    res, ref = dpc_knn_gram(static, 4, 5), R.dpc_knn(static, 4, 5)
    assert torch.equal(res.centers, ref.centers) and torch.equal(res.assignment, ref.assignment)
    line = torch.tensor([[[-1.0], [1.0], [0.0], [-0.9], [0.9], [-1.1], [1.1]]], device=device)
    res, ref = dpc_knn_gram(line, 2, 2), R.dpc_knn(line, 2, 2)
    assert torch.equal(res.assignment, ref.assignment) and int(res.assignment[0, 2]) == 0


def test_temporal_shape_and_the_gpu_tiles(device):
    # A temporal-like set (long N, wide C, bf16) with the interpreter's tiles, then a smaller one with the tiles,
    # warps and stages a GPU gets (128 x 128 tiles: several tiles per side, the symmetric skip and the transposed
    # stores all run).
    x = make_points(1, 600, 2048, torch.bfloat16, seed=9, device=device)
    res, ref = dpc_knn_gram(x, 25, 5, weight="rho_delta"), R.dpc_knn(x, 25, 5, weight="rho_delta")
    torch.testing.assert_close(res.rho, ref.rho, atol=1e-6, rtol=1e-5)
    assert torch.equal(res.centers, ref.centers)
    x = make_points(2, 300, 70, torch.bfloat16, seed=10, device=device)
    lens = torch.tensor([300, 131], device=device)
    with gpu_tiles():
        res = dpc_knn_gram(x, 9, 5, valid_len=lens)
        d = sq_dist_matrix(x, valid_len=lens)
    ref = R.dpc_knn(x, 9, 5, valid_len=lens)
    torch.testing.assert_close(res.rho, ref.rho, atol=1e-6, rtol=1e-5)
    assert torch.equal(res.centers, ref.centers) and torch.equal(res.assignment, ref.assignment)
    assert torch.equal(d, d.transpose(1, 2))


def test_bad_input_is_named(device):
    x = make_points(1, 5, 3, torch.float32, seed=0, device=device)
    with pytest.raises(ValueError, match="num_clusters"):
        dpc_knn_gram(x, 6, 2)
    with pytest.raises(ValueError, match="weight"):
        dpc_knn_gram(x, 2, 2, weight="mean")
    with pytest.raises(ValueError, match="non-finite"):
        density_delta_gram(torch.full_like(x, float("nan")), 2)


def _split_and_whole(x, lens, row0, rows, splits):
    """D's rows row0 .. row0 + rows with `splits` channel splits and in one launch, with the GPU's tiles."""
    points, sq = prepare_points(x, lens.clamp_min(1))   # a set of length 0: its points are never read
    lengths = lens.to(torch.int32)
    with gpu_tiles():
        return (launch_sq_dist_matrix(points, sq, lengths, row0, rows, splits=splits),
                launch_sq_dist_matrix(points, sq, lengths, row0, rows, splits=1))


# Under gpu_tiles() BLOCK_C is 32 (fp32) or 64 (bf16): C = 45 and 130 give 2, 3 or 5 channel blocks, the last one
# partial; 99 splits are more than the blocks (clamped: one block each).
@pytest.mark.parametrize("N,C,dtype,splits", [(1, 45, torch.float32, 2), (7, 130, torch.bfloat16, 3),
                                              (37, 130, torch.float32, 2), (37, 130, torch.float32, 3),
                                              (37, 130, torch.float32, 99), (300, 130, torch.bfloat16, 2),
                                              (300, 45, torch.float32, 99)])
def test_channel_splits_give_the_unsplit_distances(N, C, dtype, splits, device):
    B = 4
    x = make_points(B, N, C, dtype, seed=N * 3 + C, device=device)
    lens = torch.tensor([N, max(1, N // 3), 0, 1], device=device)
    valid = torch.arange(N, device=device)[None, :] < lens[:, None]
    pair = valid[:, :, None] & valid[:, None, :]
    d, whole = _split_and_whole(x, lens, 0, N, splits)
    assert not d.isnan().any(), "a partial sum was read where none was written"
    torch.testing.assert_close(d[pair], whole[pair], atol=1e-6, rtol=1e-5)
    assert torch.isinf(d[~pair]).all()
    assert torch.equal(d, d.transpose(1, 2)), "the reduce stores each tile and its mirror"
    assert (torch.diagonal(d, dim1=1, dim2=2)[valid] == 0).all()
    # A row panel (no symmetry): its tiles split the same way.
    row0, rows = N // 3, max(1, N // 2)
    d, whole = _split_and_whole(x, lens, row0, rows, splits)
    panel = pair[:, row0:row0 + rows]
    assert not d.isnan().any()
    torch.testing.assert_close(d[panel], whole[panel], atol=1e-6, rtol=1e-5)
    assert torch.isinf(d[~panel]).all()


@pytest.mark.parametrize("N,C,L,k,dtype,min_blocks", [(7, 130, 1, 3, torch.float32, 1),
                                                      (37, 130, 8, 5, torch.bfloat16, 1),
                                                      (300, 130, 9, 5, torch.bfloat16, 1),
                                                      (40, 1100, 6, 5, torch.bfloat16, None)])
def test_split_distances_cluster_as_the_reference(N, C, L, k, dtype, min_blocks, device, monkeypatch):
    # dpc_knn_gram through the custom op, so the heuristic picks the splits: with the GPU's tiles and 132 emulated
    # SMs a short video splits (a split of one channel block when MIN_SPLIT_BLOCKS is patched to 1; else C = 1100
    # is 18 bf16 blocks: 2 splits of 8 or more).
    if min_blocks is not None:
        monkeypatch.setattr(gram, "MIN_SPLIT_BLOCKS", min_blocks)
    chosen, real_splits = [], gram.channel_splits

    def recorded_splits(*args):
        chosen.append(real_splits(*args))
        return chosen[-1]

    monkeypatch.setattr(gram, "channel_splits", recorded_splits)
    B = 3
    x = make_points(B, N, C, dtype, seed=N + C, device=device)
    lens = torch.tensor([N, max(L, N // 2), L], device=device)
    with gpu_tiles():
        res = dpc_knn_gram(x, L, k, weight="rho_delta", valid_len=lens)
    assert chosen and min(splits for splits, _ in chosen) > 1, chosen
    ref = R.dpc_knn(x, L, k, weight="rho_delta", valid_len=lens)
    torch.testing.assert_close(res.rho, ref.rho, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.delta, ref.delta, atol=1e-5, rtol=1e-4)
    assert torch.equal(res.centers, ref.centers) and torch.equal(res.assignment, ref.assignment)
    assert not res.prototypes.isnan().any()


def test_channel_splits_fill_the_gpu_only_for_short_videos(monkeypatch):
    C, bf16 = 22528, torch.bfloat16    # the model's temporal features: 352 blocks of 64 channels
    cpu = torch.device("cpu")
    assert channel_splits(1, 200, 200, C, gram_config(200, C, bf16), cpu) == (1, C), "interpreter: no split"
    with gpu_tiles():
        short, long = gram_config(200, C, bf16), gram_config(3600, C, bf16)
        fp32 = gram_config(200, C, torch.float32)
        # T = 200: 3 upper-triangle tiles of 128; 2 x 132 SMs would want 88 splits, 8 blocks each allow 44.
        assert channel_splits(1, 200, 200, C, short, cpu) == (44, 8 * 64)
        assert 3 * 44 >= EMULATED_SMS
        assert channel_splits(1, 3600, 3600, C, long, cpu) == (1, C)   # 435 tiles fill the SMs
        assert channel_splits(8, 200, 200, C, short, cpu) == (11, 32 * 64)   # 24 tiles: 264 / 24
        # A row panel counts all its tiles: 1 x 2, then 2 x 132 / 2 splits, capped at 44 again.
        assert channel_splits(1, 100, 200, C, short, cpu) == (44, 8 * 64)
        assert channel_splits(1, 200, 200, C, fp32, cpu) == (27, 27 * 32)   # 10 tiles of 64: 264 / 10
        assert channel_splits(1, 200, 200, 1000, short, cpu) == (2, 8 * 64)   # 16 blocks: 2 splits of 8
        assert channel_splits(1, 200, 200, 900, short, cpu) == (1, 15 * 64)   # 15 blocks: too few to split
        # The partial buffer's budget: 10 splits' worth, then less than one split's.
        monkeypatch.setattr(gram, "PARTIAL_BYTES", 10 * 200 * 200 * 4)
        assert channel_splits(1, 200, 200, C, short, cpu)[0] == 10
        monkeypatch.setattr(gram, "PARTIAL_BYTES", 200 * 200 * 4 - 1)
        assert channel_splits(1, 200, 200, C, short, cpu)[0] == 1
    # Forced: clamped to the channel blocks, whole blocks per split, no empty split.
    for forced, expected in ((0, 1), (3, 3), (5, 5), (1000, 352)):
        splits, chans = channel_splits(1, 200, 200, C, short, cpu, forced)
        assert splits == expected and chans % 64 == 0 and (splits - 1) * chans < C <= splits * chans
