"""Each DPC-KNN kernel against dynfocus_kernels.reference (DESIGN section 4), outputs NaN-poisoned."""
import pytest
import torch

import dynfocus_kernels as K
from dynfocus_kernels import reference as R
from kernel_utils import DPC_KNN_CASES, DTYPE_TOL, INT_POISON, make_points, poison_empty, ragged_lengths

SIZES = [(1, 1), (2, 33), (7, 1408), (63, 1), (63, 33), (257, 33), (257, 1408)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_empty(monkeypatch)


def _cases():
    for N, C in SIZES:
        for dtype in DTYPES:
            if N * C > 63 * 1408 and dtype != torch.float32:
                continue  # the big fp32 case covers the size; 16-bit inputs are covered at the other sizes
            yield pytest.param(N, C, dtype, id=f"N{N}-C{C}-{str(dtype)[6:]}")


@pytest.mark.parametrize("N,C,dtype", list(_cases()))
def test_density_and_delta_match_reference(N, C, dtype, device):
    B, k = 3, 5
    x = make_points(B, N, C, dtype, seed=N * 131 + C, device=device)
    lens = ragged_lengths(B, N, seed=N + C, device=device)
    rho = K.knn_density(x, k, valid_len=lens)
    ref_rho = R.knn_density(x, k, valid_len=lens)
    assert not rho.isnan().any()
    torch.testing.assert_close(rho, ref_rho, atol=1e-6, rtol=1e-5)
    # Feed both the same rho so the comparison checks delta, not rounding-level density ties.
    delta = K.density_delta(x, ref_rho, valid_len=lens)
    ref_delta = R.density_delta(x, ref_rho, valid_len=lens)
    assert not delta.isnan().any()
    torch.testing.assert_close(delta, ref_delta, atol=1e-5, rtol=1e-4)
    pad = torch.arange(N, device=device)[None, :] >= lens[:, None]
    assert (rho[pad] == 0).all() and (delta[pad] == 0).all()


@pytest.mark.parametrize("N,C,dtype", list(_cases()))
def test_assignment_matches_reference(N, C, dtype, device):
    B = 2
    x = make_points(B, N, C, dtype, seed=N * 17 + C, device=device)
    lens = ragged_lengths(B, N, seed=N * 3 + C, device=device)
    L = min(5, int(lens.min()))
    g = torch.Generator().manual_seed(N + C)
    centers = torch.stack([torch.randperm(int(n), generator=g)[:L] for n in lens.tolist()]).to(device)
    got = K.assign_to_centers(x, centers, valid_len=lens)
    torch.testing.assert_close(got, R.assign_to_centers(x, centers, valid_len=lens), rtol=0, atol=0)
    assert (got != INT_POISON).all()
    ranks = torch.arange(L, device=device).expand(B, L)
    assert torch.equal(torch.gather(got, 1, centers), ranks), "each centre must map to itself"


def test_assignment_ties_go_to_lowest_rank(device):
    # 1-D points: 0 is equidistant from the centres at -1 and +1; the centre listed first (rank 0) wins.
    x = torch.tensor([[[-1.0], [1.0], [0.0], [0.5]]], device=device)
    for centers, expected_mid in (([1, 0], 0), ([0, 1], 0)):
        c = torch.tensor([centers], device=device)
        got = K.assign_to_centers(x, c)
        assert got[0, 2].item() == expected_mid
        assert got[0, 3].item() == centers.index(1)
        torch.testing.assert_close(got, R.assign_to_centers(x, c), rtol=0, atol=0)


@pytest.mark.parametrize("L", [2, 65])
def test_assignment_reads_distances_within_the_tie_slack_as_ties(L, device):
    """Two centres whose squared distances to a point differ by far less than TIE_EPS of the norms are a tie (the
    lower rank wins), even where the higher rank is nearer in exact arithmetic: which of two such rounded values
    comes out smaller depends on the summation order (Triton version, tiles), so it must not decide. L = 65 runs
    the two-launch path (smallest distance, then the tie)."""
    far = [[float(i)] for i in range(10, 10 + L - 2)]  # more centres, all farther away
    x = torch.tensor([[[1.0 + 1e-6], [-1.0], [0.0], *far]], device=device)
    centers = torch.tensor([[0, 1, *range(3, L + 1)]], device=device)  # +1.000001 is rank 0, -1 is rank 1
    for module in (K, R):
        got = module.assign_to_centers(x, centers)
        assert got[0, 2].item() == 0, module.__name__
    clear = torch.tensor([[[1.1], [-1.0], [0.0], *far]], device=device)  # a real difference: the nearer wins
    for module in (K, R):
        assert module.assign_to_centers(clear, centers)[0, 2].item() == 1, module.__name__


@pytest.mark.parametrize("L", [65, 200])
def test_many_centres_span_several_blocks(L, device):
    """L past one block of centres (64): the assignment, the pooling and the whole clustering match the reference;
    integer-valued points make exact distance ties between blocks, which the lowest rank must win."""
    B, N, C = 2, 230, 3
    g = torch.Generator().manual_seed(L)
    x = torch.randint(-3, 4, (B, N, C), generator=g).float().to(device)
    lens = torch.tensor([N, N - 17], device=device)
    centers = torch.stack([torch.randperm(int(n), generator=g)[:L] for n in lens.tolist()]).to(device)
    got = K.assign_to_centers(x, centers, valid_len=lens)
    torch.testing.assert_close(got, R.assign_to_centers(x, centers, valid_len=lens), rtol=0, atol=0)
    assert (got[:, :N - 17] >= 64).any(), "some points must go to a centre of a later block"
    w = torch.rand(B, N, generator=g).to(device)
    torch.testing.assert_close(K.weighted_pool(x, got, w, L), R.weighted_pool(x, got, w, L), rtol=1e-6, atol=1e-6)
    y = make_points(B, N, 16, torch.float32, seed=L, device=device)
    fused, ref = K.dpc_knn(y, L, 4, valid_len=lens), R.dpc_knn(y, L, 4, valid_len=lens)
    for name in ("centers", "assignment"):
        torch.testing.assert_close(getattr(fused, name), getattr(ref, name), rtol=0, atol=0)
    torch.testing.assert_close(fused.prototypes, ref.prototypes, rtol=1e-5, atol=1e-5)


def test_k_past_the_set_size_counts_every_point(device):
    x = make_points(2, 6, 8, torch.float32, seed=3, device=device)
    lens = torch.tensor([6, 4], device=device)
    for k in (6, 50):
        torch.testing.assert_close(K.knn_density(x, k, valid_len=lens), R.knn_density(x, k, valid_len=lens),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("N,L", [(1, 1), (7, 3), (63, 25), (257, 16), (1500, 25)])
def test_select_centers_matches_stable_sort(N, L, device):
    B = 3
    g = torch.Generator().manual_seed(N)
    # Integer-valued scores make many exact ties: the lower index must come first.
    score = torch.randint(0, 4, (B, N), generator=g).float().to(device)
    lens = ragged_lengths(B, N, seed=N, minimum=L, device=device)
    got = K.select_centers(score, L, valid_len=lens)
    ref = R.select_centers(score, L, valid_len=lens)
    assert torch.equal(got, ref)


def test_static_video_clusters_deterministically(device):
    # All frames identical: every distance is 0, every density ties, so the index rule decides everything.
    frame = make_points(1, 1, 1408, torch.bfloat16, seed=5, device=device)
    x = frame.repeat(2, 200, 1)
    res = K.dpc_knn(x, 25, 5, weight="rho_delta")
    assert torch.equal(res.rho, torch.ones_like(res.rho))
    assert torch.equal(res.delta, torch.zeros_like(res.delta))
    assert torch.equal(res.centers, torch.arange(25, device=device).expand(2, 25))
    expected = torch.zeros(2, 200, dtype=torch.int64, device=device)
    expected[:, :25] = torch.arange(25, device=device)
    assert torch.equal(res.assignment, expected)
    torch.testing.assert_close(res.prototypes.float(), frame.float().expand(2, 25, 1408), rtol=0, atol=0)
    ref = R.dpc_knn(x, 25, 5, weight="rho_delta")
    assert torch.equal(res.centers, ref.centers) and torch.equal(res.assignment, ref.assignment)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_duplicated_points_tie_by_index(dtype, device):
    # Every point appears twice: densities tie in pairs and the copy with the lower index ranks first.
    base = make_points(2, 20, 33, dtype, seed=11, device=device)
    x = torch.cat([base, base], dim=1)
    res = K.dpc_knn(x, 6, 3)
    ref = R.dpc_knn(x, 6, 3)
    assert torch.equal(res.centers, ref.centers)
    assert torch.equal(res.assignment, ref.assignment)
    assert (res.centers < 20).all(), "a duplicate's lower-index copy must be the one chosen"
    torch.testing.assert_close(res.prototypes, ref.prototypes, atol=DTYPE_TOL[dtype], rtol=DTYPE_TOL[dtype])


@pytest.mark.parametrize("weight", ["uniform", "rho_delta"])
@pytest.mark.parametrize("N,C,L,k,dtype", DPC_KNN_CASES)
def test_dpc_knn_matches_reference(N, C, L, k, dtype, weight, device):
    B = 3
    x = make_points(B, N, C, dtype, seed=N + 1000 * L, device=device)
    lens = ragged_lengths(B, N, seed=N, minimum=L, device=device)
    res = K.dpc_knn(x, L, k, weight=weight, valid_len=lens)
    ref = R.dpc_knn(x, L, k, weight=weight, valid_len=lens)
    torch.testing.assert_close(res.rho, ref.rho, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.delta, ref.delta, atol=1e-5, rtol=1e-4)
    assert torch.equal(res.centers, ref.centers)
    assert torch.equal(res.assignment, ref.assignment)
    assert res.prototypes.dtype == dtype and res.prototypes.shape == (B, L, C)
    tol = DTYPE_TOL[dtype]
    torch.testing.assert_close(res.prototypes, ref.prototypes, atol=tol, rtol=tol)


def test_dpc_knn_is_deterministic(device):
    x = make_points(2, 120, 64, torch.bfloat16, seed=3, device=device)
    a = K.dpc_knn(x, 10, 5, weight="rho_delta")
    b = K.dpc_knn(x, 10, 5, weight="rho_delta")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_temporal_shape_streams_without_n_squared_memory(device):
    # A temporal-like set (long N, wide C) runs through the streaming kernels; only the spatially small
    # reference check is affordable on the CPU interpreter, so compare density and delta on a slice of rows' sets.
    x = make_points(1, 600, 2048, torch.bfloat16, seed=9, device=device)
    res = K.dpc_knn(x, 25, 5, weight="rho_delta")
    ref = R.dpc_knn(x, 25, 5, weight="rho_delta")
    torch.testing.assert_close(res.rho, ref.rho, atol=1e-6, rtol=1e-5)
    assert torch.equal(res.centers, ref.centers)


@pytest.mark.parametrize("N,splits", [(257, 2), (600, 3), (600, 2)])
def test_column_splits_give_the_same_densities_and_deltas(N, splits, device):
    # Ragged lengths leave some splits with no valid column at all.
    B, C, k = 3, 40, 5
    x = make_points(B, N, C, torch.float32, seed=N + splits, device=device)
    lens = torch.tensor([N, 200, 3], device=device)
    rho = K.knn_density(x, k, valid_len=lens, splits=splits)
    torch.testing.assert_close(rho, R.knn_density(x, k, valid_len=lens), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rho, K.knn_density(x, k, valid_len=lens, splits=1), atol=1e-7, rtol=1e-6)
    delta = K.density_delta(x, rho, valid_len=lens, splits=splits)
    assert torch.equal(delta, K.density_delta(x, rho, valid_len=lens, splits=1))
    torch.testing.assert_close(delta, R.density_delta(x, rho, valid_len=lens), atol=1e-5, rtol=1e-4)


def test_densest_point_gets_the_largest_distance_in_the_set(device):
    # 1-D points: the densest point (near 0.1) is not at either end, so its own farthest point (-10, at 10.05)
    # differs from the set's largest distance (-10 to 3: 13).
    x = torch.tensor([[[-10.0], [0.0], [0.1], [0.2], [0.05], [3.0]]], device=device)
    rho = K.knn_density(x, 3)
    delta = K.density_delta(x, rho)
    densest = int(rho.argmax())
    assert densest in (1, 2, 3, 4)
    assert delta[0, densest].item() == pytest.approx(13.0, rel=1e-5)
    torch.testing.assert_close(delta, R.density_delta(x, rho), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clustering_is_translation_invariant(dtype, device):
    # Points that differ by a tiny fraction of their norm (a large common offset, as features share) must cluster
    # exactly as the same points without the offset.
    g = torch.Generator().manual_seed(12)
    spread = torch.randn(2, 40, 64, generator=g) * 0.01
    offset = torch.randn(1, 1, 64, generator=g) * 10
    near = K.dpc_knn(spread.to(dtype).to(device), 6, 4)
    far = K.dpc_knn((spread + offset).to(dtype).to(device), 6, 4)
    if dtype == torch.float32:
        assert torch.equal(near.centers, far.centers) and torch.equal(near.assignment, far.assignment)
    assert len(set(far.assignment[0].tolist())) == 6
    assert far.rho.std() > 0, "distinct points must not all collapse to distance 0"
    ref = R.dpc_knn((spread + offset).to(dtype).to(device), 6, 4)
    assert torch.equal(far.centers, ref.centers) and torch.equal(far.assignment, ref.assignment)


def test_pooling_reads_sets_beyond_int32_offsets(device):
    # Three sets 2**30 elements apart: the third starts past 2**31, which wraps an int32 offset.
    B, N, C = 3, 4, 8
    stride = 2**30
    storage = torch.empty(2 * stride + N * C, dtype=torch.bfloat16, device=device)  # untouched pages stay virtual
    x = torch.as_strided(storage, (B, N, C), (stride, C, 1))
    for b in range(B):
        storage[b * stride: b * stride + N * C] = float(b + 1)
    assignment = torch.zeros(B, N, dtype=torch.int64, device=device)
    pooled = K.weighted_pool(x, assignment, None, 1)
    assert pooled[:, 0, 0].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("layout", ["sliced", "permuted"])
def test_non_contiguous_points_cluster_like_contiguous_ones(layout, device):
    base = make_points(3, 50, 40, torch.bfloat16, seed=21, device=device)
    if layout == "sliced":       # the connector passes v[:, 1:] of the ViT output
        x = torch.cat([torch.randn_like(base[:, :1]), base], dim=1)[:, 1:]
    else:                        # dense but channel-major
        x = base.transpose(1, 2).contiguous().transpose(1, 2)
    assert not x.is_contiguous()
    got, want = K.dpc_knn(x, 7, 4, weight="rho_delta"), K.dpc_knn(base.contiguous(), 7, 4, weight="rho_delta")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_non_finite_padding_is_ignored(device):
    x = make_points(2, 40, 16, torch.float32, seed=31, device=device)
    lens = torch.tensor([30, 40], device=device)
    poisoned = x.clone()
    poisoned[0, 30:] = float("nan")
    poisoned[0, 35:] = float("inf")
    for ops in (K, R):
        clean = ops.dpc_knn(x, 5, 4, valid_len=lens, check=False)
        dirty = ops.dpc_knn(poisoned, 5, 4, valid_len=lens, check=False)
        assert torch.equal(clean.centers, dirty.centers) and torch.equal(clean.assignment, dirty.assignment)
        torch.testing.assert_close(clean.rho, dirty.rho, rtol=0, atol=0)
        assert dirty.prototypes.isfinite().all(), ops.__name__  # 0 * NaN must not reach the pooled sums
        torch.testing.assert_close(dirty.prototypes, clean.prototypes, rtol=1e-6, atol=1e-6)


def test_fp16_points_whose_differences_pass_the_fp16_range(device):
    """Finite fp16 points 120000 apart: centring in fp16 would overflow to inf and make every point identical."""
    x = torch.tensor([60000.0, 59000.0, 60000.0, -60000.0, -59000.0]).repeat(16, 1).T[None].half().to(device)
    d = (torch.cdist(x.double(), x.double()) / 4)[0]  # the definition in float64, C = 16
    rho = torch.exp(-(d ** 2).topk(2, dim=-1, largest=False).values.mean(-1))
    ids = torch.arange(5)
    higher = (rho[None, :] > rho[:, None]) | ((rho[None, :] == rho[:, None]) & (ids[None, :] < ids[:, None]))
    delta = torch.where(higher, d, torch.inf).min(-1).values
    delta = torch.where(higher.any(-1), delta, d.max())
    assert delta.max() > 1e5  # the densest point's delta: 120000, past fp16's range
    for ops in (K, R):
        res = ops.dpc_knn(x, 2, 2)
        torch.testing.assert_close(res.rho[0].double(), rho, rtol=1e-5, atol=0)
        # fp32 norm expansion: d^2 ~ 1e6 next to squared norms ~ 1e11 keeps about 3 digits of d.
        torch.testing.assert_close(res.delta[0].double(), delta, rtol=5e-3, atol=0)


def test_unchecked_valid_len_past_n_reads_no_other_set(device):
    x = make_points(3, 20, 16, torch.float32, seed=41, device=device)
    within = K.dpc_knn(x, 4, 3, valid_len=torch.tensor([20, 7, 20], device=device))
    past = K.dpc_knn(x, 4, 3, valid_len=torch.tensor([25, 7, 2 ** 30], device=device), check=False)
    for name in ("centers", "assignment", "rho", "delta", "prototypes"):
        torch.testing.assert_close(getattr(past, name), getattr(within, name), rtol=0, atol=0)
