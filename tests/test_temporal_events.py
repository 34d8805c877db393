"""The connector's fused temporal clustering (kernels/temporal.py) against the reference DPC-KNN run video by video
on the pooled frames: centres, assignment, rho, delta, prototypes (w = exp(rho * delta)) and their summaries.
The parity and tie tests take the `device` fixture: CUDA in the GPU round (bench/gpu_session.sh), else the CPU."""
import pytest
import torch

from dynfocus_kernels import reference as R
from dynfocus_kernels.common import gpu_tiles
from dynfocus_kernels.temporal import temporal_events
from dynfocus_infer.config import ConnectorConfig
from dynfocus_infer.models.connector_parts import pool_frames, ragged_frames
from dynfocus_infer.models.event_scorer import prototype_summary
from kernel_utils import DTYPE_TOL, poison_empty


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_empty(monkeypatch)


def run_fused(patches, frames, config, device="cpu", distances="auto"):
    """The fused path on `device` (CUDA in the GPU round), its results on the CPU."""
    layout = ragged_frames(frames, patches.shape[0], config, torch.device(device))
    out = temporal_events(patches.to(device), layout.frame_starts, layout.frames, layout.events,
                          max_frames=layout.max_frames, max_events=layout.max_events, patch_grid=config.patch_grid,
                          pool_grid=config.pool_grid, k=config.temporal_k, any_long=len(layout.long_videos) > 0,
                          distances=distances)
    return type(out)(*(t.cpu() for t in out)), layout


def assert_matches_reference(patches, frames, config, device="cpu", distances="auto"):
    out, layout = run_fused(patches, frames, config, device, distances)
    patches = patches.cpu()
    tol = DTYPE_TOL[patches.dtype]
    P, C = config.pool_grid ** 2, patches.shape[-1]
    start = 0
    for b, T in enumerate(frames):
        L = layout.num_events[b]
        pooled = pool_frames(patches[start:start + T], config.patch_grid, config.pool_grid).flatten(1)
        ref = R.dpc_knn(pooled[None], L, config.temporal_k, weight="rho_delta")
        assert out.centres[b, :L].tolist() == ref.centers[0].tolist(), f"video {b}"
        assert out.centres[b, L:].tolist() == [0] * (layout.max_events - L)
        assert out.assignment[b, :T].tolist() == ref.assignment[0].tolist(), f"video {b}"
        assert out.assignment[b, T:].tolist() == [-1] * (layout.max_frames - T)
        torch.testing.assert_close(out.rho[b, :T], ref.rho[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.delta[b, :T], ref.delta[0], atol=1e-5, rtol=1e-4)
        assert not out.rho[b, T:].any() and not out.delta[b, T:].any()
        torch.testing.assert_close(out.pooled[b, :T], pooled, atol=tol, rtol=tol)
        assert not out.pooled[b, T:].any()
        torch.testing.assert_close(out.prototypes[b, :L], ref.prototypes[0], atol=tol, rtol=tol)
        assert not out.prototypes[b, L:].any()
        summary = prototype_summary(ref.prototypes[0].unflatten(-1, (P, C)))
        torch.testing.assert_close(out.summaries[b, :L], summary, atol=tol, rtol=tol)
        start += T
    return out


def config_for(num_events=25, **sizes):
    return ConnectorConfig(vision_width=sizes.get("C", 24), llm_width=32, qformer_width=16,
                           patch_grid=sizes.get("grid", 8), pool_grid=sizes.get("pool", 4), num_events=num_events)


def patches_for(frames, config, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(frames), config.patch_grid ** 2, config.vision_width, generator=g).to(dtype)


# Ragged batches of short (T <= L) and long videos, a one-frame video, every dtype, a 2x2 pool of a 6x6 grid.
@pytest.mark.parametrize("frames,num_events,dtype", [([12, 7], 5, torch.float32), ([6], 25, torch.float32),
                                                      ([30, 2, 5, 40], 8, torch.bfloat16), ([3, 3], 25, torch.float16),
                                                      ([1, 9, 26], 25, torch.float32)])
@pytest.mark.parametrize("distances", ["gram", "stream"])
def test_temporal_events_match_the_reference_video_by_video(frames, num_events, dtype, distances, device):
    """Both distance sources: the matrix computed once ("gram", what "auto" takes at these sizes) and tiles
    computed by each pass ("stream", what "auto" takes past 256 MB)."""
    config = config_for(num_events)
    assert_matches_reference(patches_for(frames, config, dtype, seed=sum(frames)), frames, config, device, distances)


def test_other_grids_and_widths(device):
    config = config_for(4, C=34, grid=6, pool=3)
    assert_matches_reference(patches_for([9, 4], config, torch.float32, seed=3), [9, 4], config, device)


def test_static_and_repeated_frames_tie_by_index(device):
    """A static video (identical frames: rho 1, delta 0 everywhere but the densest) and a video cycling through
    three frames: the index rule decides, as in the reference."""
    config = config_for(5)
    g = torch.Generator().manual_seed(8)
    static = torch.randn(1, 64, 24, generator=g).expand(10, 64, 24)
    cycle = torch.randn(3, 64, 24, generator=g).repeat(4, 1, 1)
    patches = torch.cat([static, cycle]).contiguous()
    out = assert_matches_reference(patches, [10, 12], config, device)
    assert out.centres[0].tolist() == [0, 1, 2, 3, 4]


def test_gpu_launch_configuration_with_column_splits():
    """The GPU's tiles: 64-row blocks and column splits (132 SMs emulated), so rho and delta merge several
    splits' partials; a long and a short video."""
    config = config_for(6)
    frames = [130, 5]
    patches = patches_for(frames, config, torch.float32, seed=9)
    with gpu_tiles():
        for distances in ("gram", "stream"):
            assert_matches_reference(patches, frames, config, distances=distances)


def test_non_contiguous_patch_tokens(device):
    config = config_for(4)
    frames = [7, 5]
    wide = patches_for(frames, config_for(4, C=48), torch.float32, seed=4).to(device)
    assert_matches_reference(wide[:, :, ::2], frames, config, device)


def test_unknown_distance_source_is_named():
    config = config_for(3)
    with pytest.raises(ValueError, match="distances"):
        run_fused(patches_for([4], config, torch.float32, seed=1), [4], config, distances="cached")


def test_the_ops_pass_opcheck():
    from dynfocus_kernels import library

    config = config_for(3)
    frames = [5, 2]
    patches = patches_for(frames, config, torch.float32, seed=2)
    layout = ragged_frames(frames, patches.shape[0], config, patches.device)
    out, _ = run_fused(patches, frames, config)
    pooled, centred, partial = library.pool_centre(patches, layout.frame_starts, layout.frames, 5, 8, 4)
    sq = partial.sum(-1)
    best, ids, far = library.knn_lists(centred, sq, layout.frames, 3, 1, 64, None)
    _, nbr_d, nbr_id = library.event_rho(best, ids, layout.frames)
    near = library.delta_near(centred, sq, out.rho, layout.frames, 1, 64, None, nbr_d, nbr_id)
    for op, args in [(library.pool_centre, (patches, layout.frame_starts, layout.frames, 5, 8, 4)),
                     (library.knn_lists, (centred, sq, layout.frames, 3, 1, 64, None)),
                     (library.event_rho, (best, ids, layout.frames)),
                     (library.delta_near, (centred, sq, out.rho, layout.frames, 1, 64, None, nbr_d, nbr_id)),
                     (library.event_centres, (out.rho, near, far, layout.frames, layout.events, 3)),
                     (library.event_pool, (out.pooled, out.assignment, out.rho, out.delta, 16, 3))]:
        torch.library.opcheck(op, args)


def _rays(num_sets, per_ray, num_rays, C, seed):
    """Points on rays from `num_rays` cores (rows 0 .. num_rays - 1, 20 apart on the axes), spaced wider away from
    the core (0.2 + 0.004 i): along a ray the density falls with the distance past a peak near the core, so most
    points have a denser point among their nearest. The ray points are shuffled over the rows after the cores."""
    g = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(num_sets):
        cores = 20 * torch.eye(num_rays, C)
        direction = torch.nn.functional.normalize(torch.randn(num_rays, C, generator=g), dim=-1)
        steps = torch.arange(1, per_ray + 1, dtype=torch.float32)
        radius = 0.2 * steps + 0.002 * steps ** 2
        points = (cores[:, None] + radius[None, :, None] * direction[:, None]).reshape(-1, C)
        points = points[torch.randperm(points.shape[0], generator=g)]
        sets.append(torch.cat([cores, points]))
    return torch.stack(sets)


@pytest.mark.parametrize("distances", ["gram", "stream"])
def test_delta_from_the_knn_lists_skips_the_pass_where_a_denser_neighbour_is_listed(distances):
    """Rows whose k nearest hold a denser point take delta from the list; a block of 64 rows that all do skips the
    column pass. On the rays, D's rows of such blocks are NaN-poisoned (gram) and delta still equals the full pass's
    exactly. Then random ragged sets (most rows listed, some not)."""
    from dynfocus_kernels.density_delta import launch_delta_near_far
    from dynfocus_kernels.distance import column_splits, launch_config, lengths_i32, prepare_points
    from dynfocus_kernels.gram import launch_sq_dist_matrix
    from dynfocus_kernels.knn_density import launch_knn_lists
    from dynfocus_kernels.temporal import launch_rho

    k, block = 5, 64
    cases = ((_rays(2, 75, 4, 24, seed=3), torch.tensor([304, 200]), True),
             (torch.randn(3, 150, 20, generator=torch.Generator().manual_seed(4)), torch.tensor([150, 97, 1]), False))
    with gpu_tiles():
        for x, valid_len, rays in cases:
            B, N, C = x.shape
            assert launch_config(N, C, x.dtype)["BLOCK_M"] == block
            points, sq = prepare_points(x, valid_len)
            lengths = lengths_i32(x, valid_len)
            splits, cols = column_splits(x, launch_config(N, C, points.dtype))
            d = launch_sq_dist_matrix(points, sq, lengths)
            source = d if distances == "gram" else None
            best, ids, far = launch_knn_lists(points, sq, lengths, k, splits, cols, source)
            rho, nbr_d, nbr_id = launch_rho(best, ids, lengths)
            full_near, full_far = launch_delta_near_far(points, sq, rho, lengths, splits, cols, source)
            valid = torch.arange(N) < valid_len[:, None]
            assert torch.equal(far.amax(1)[valid], full_far.amax(1)[valid])
            listed = (nbr_id >= 0) & valid[..., None]   # padding rows' lists are never read
            if distances == "gram":  # each row's k smallest distances, ascending, and ids of points at them
                expected = torch.where(valid[:, None, :], d, float("inf")).topk(k, dim=-1, largest=False).values
                assert torch.equal(nbr_d[valid], expected[valid])
                assert torch.equal(listed[valid], torch.isfinite(expected)[valid])
                assert torch.equal(torch.gather(d, 2, nbr_id.clamp_min(0).long())[listed], nbr_d[listed])
            rho_listed = torch.gather(rho, 1, nbr_id.clamp_min(0).long().flatten(1)).view_as(nbr_d)
            rows = torch.arange(N)[None, :, None]
            denser = (rho_listed > rho[..., None]) | ((rho_listed == rho[..., None]) & (nbr_id < rows))
            needs = valid & ~(denser & listed).any(-1)
            poisoned = d.clone()
            if rays:
                padded = torch.nn.functional.pad(needs, (0, -N % block))
                skipped = ~padded.unflatten(1, (-1, block)).any(-1)       # [B, blocks]
                assert skipped.any() and (~skipped).any(), skipped
                assert needs.sum() < 0.1 * valid.sum(), needs.sum()   # each ray's density peak, and few more
                poisoned[skipped.repeat_interleave(block, dim=1)[:, :N]] = float("nan")
            else:
                assert needs.sum() > 0 and needs.sum() < 0.5 * valid.sum(), needs.sum()
            near, _ = launch_delta_near_far(points, sq, rho, lengths, splits, cols,
                                            poisoned if distances == "gram" else None, (nbr_d, nbr_id))
            assert torch.equal(near.amin(1)[valid], full_near.amin(1)[valid])
