"""Top-K mask builder (DESIGN.md section 7): C++ twin and CUDA kernel against the torch reference."""
import importlib
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import dynfocus_infer
from dynfocus_infer import ops
from dynfocus_infer.ops import TopKMask, build_topk_mask, build_topk_mask_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def random_batch(seed, batch_size, max_protos, max_frames, *, tie_levels=None, keep="random",
                 duplicate_centres=False, empty_every=0, single_frame=False):
    """A ragged batch: per video T_b in [1, max_frames], L_b <= min(max_protos, T_b), K_b in [1, L_b].

    Padding (entries at or beyond L_b) holds NaN scores and out-of-range centres, which must be ignored.
    """
    g = torch.Generator().manual_seed(seed)
    B, L_max, T_max = batch_size, max_protos, max_frames
    if single_frame:
        num_frames = torch.ones(B, dtype=torch.int64)
    else:
        num_frames = torch.randint(1, T_max + 1, (B,), generator=g)
    limit = num_frames if not duplicate_centres else torch.full((B,), L_max)
    num_protos = torch.minimum(torch.randint(1, L_max + 1, (B,), generator=g), limit).clamp(max=L_max)
    if keep == "all":
        num_keep = num_protos.clone()
    elif keep == "one":
        num_keep = torch.ones(B, dtype=torch.int64)
    else:
        num_keep = (torch.rand(B, generator=g) * num_protos).floor().long() + 1
    if empty_every:
        empty = torch.arange(B) % empty_every == 1
        num_protos[empty], num_keep[empty] = 0, 0
    if duplicate_centres:
        centres = (torch.rand(B, L_max, generator=g) * num_frames[:, None]).floor().long()
    else:  # distinct frames: a random permutation of range(T_b) per video, the first L_b taken
        order_keys = torch.rand(B, max(T_max, L_max), generator=g)
        order_keys[torch.arange(order_keys.shape[1]) >= num_frames[:, None]] = 2.0
        centres = order_keys.argsort(dim=1)[:, :L_max]
    if tie_levels is None:
        scores = torch.randn(B, L_max, generator=g)
    else:
        scores = torch.randint(0, tie_levels, (B, L_max), generator=g).float()
    padding = torch.arange(L_max) >= num_protos[:, None]
    scores[padding] = float("nan")
    centres[padding] = -3
    return [scores, centres, num_protos, num_keep, num_frames]


CASES = {
    "ragged": lambda: random_batch(1, 7, 13, 31),
    "keep_all": lambda: random_batch(2, 9, 17, 40, keep="all"),
    "keep_one": lambda: random_batch(3, 9, 17, 40, keep="one"),
    "single_prototype": lambda: random_batch(4, 5, 1, 9),
    "single_frame": lambda: random_batch(5, 6, 4, 4, single_frame=True),
    "all_scores_equal": lambda: random_batch(6, 8, 23, 50, tie_levels=1),
    "three_score_levels": lambda: random_batch(7, 8, 23, 50, tie_levels=3),
    "duplicate_centres": lambda: random_batch(8, 8, 19, 11, duplicate_centres=True, tie_levels=4),
    "empty_slots": lambda: random_batch(9, 9, 12, 20, empty_every=3),
    "more_protos_than_threads": lambda: random_batch(10, 3, 300, 700),
    "connector_max": lambda: random_batch(11, 64, 200, 3600),
}


def poisoned_outputs(B, max_keep, max_frames, device):
    return TopKMask(
        kept_ids=torch.full((B, max_keep), 7777, dtype=torch.int64, device=device),
        frame_mask=torch.ones(B, max_frames, dtype=torch.bool, device=device),
        token_offsets=torch.full((B, max_frames + 1), -999, dtype=torch.int64, device=device),
        total_tokens=torch.full((B,), -999, dtype=torch.int64, device=device),
    )


def assert_same(got: TopKMask, want: TopKMask):
    for name, g, w in zip(TopKMask._fields, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{name}: {g.dtype} {g.shape} vs {w.dtype} {w.shape}"
        mismatch = (g.cpu() != w.cpu()).nonzero()
        assert mismatch.numel() == 0, f"{name} differs first at {mismatch[0].tolist()} ({mismatch.shape[0]} entries)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_with_poisoned_outputs(case, device):
    inputs = [t.to(device) for t in CASES[case]()]
    want = build_topk_mask_reference(*inputs)
    max_keep, max_frames = want.kept_ids.shape[1], want.frame_mask.shape[1]
    out = poisoned_outputs(inputs[0].shape[0], max_keep, max_frames, device)
    got = build_topk_mask(*inputs, out=out)
    assert all(g is o for g, o in zip(got, out))
    assert_same(got, want)
    assert_same(build_topk_mask(*inputs), want)  # freshly allocated outputs too


@pytest.mark.parametrize("device", DEVICES)
def test_padding_of_outputs_beyond_the_batch_maxima(device):
    inputs = [t.to(device) for t in random_batch(12, 6, 10, 15)]
    max_keep, max_frames = int(inputs[3].max()) + 5, int(inputs[4].max()) + 9
    out = poisoned_outputs(6, max_keep, max_frames, device)
    got = build_topk_mask(*inputs, max_keep=max_keep, max_frames=max_frames, out=out, check=False)
    assert_same(got, build_topk_mask_reference(*inputs, max_keep=max_keep, max_frames=max_frames))
    assert (got.kept_ids[:, -5:] == -1).all() and not got.frame_mask[:, -9:].any()
    assert (got.token_offsets[:, -10:] == got.total_tokens[:, None]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_strided_int64_inputs_and_half_scores(device):
    scores, centres, num_protos, num_keep, num_frames = random_batch(13, 5, 11, 30, tie_levels=5)
    wide_scores = torch.randn(5, 40)
    wide_scores[:, 3:14] = scores  # row stride 40: a view into a wider tensor
    scores_view = wide_scores.to(device)[:, 3:14]
    centres_t = centres.t().contiguous().t().to(device)  # column-major int64
    counts = [c.to(device) for c in (num_protos, num_keep, num_frames)]
    want = build_topk_mask_reference(scores.to(device), centres.to(device), *counts)
    assert_same(build_topk_mask(scores_view, centres_t, *counts), want)
    assert_same(build_topk_mask(scores.to(device).half(), centres.to(torch.int16).to(device), *counts), want)


def test_hand_worked_example():
    # Video 0: scores tie at 0.9 between ids 1 and 3; K=2 keeps {1, 3}; centres 1 and 2 are keyframes.
    # Video 1: L=3 of 4 (the 4th is padding), K=2 keeps ids 2 (3.0) and 1 (2.0), by frame: 1 (frame 1), 2 (frame 2).
    scores = torch.tensor([[0.5, 0.9, 0.1, 0.9], [1.0, 2.0, 3.0, 9.0]])
    centres = torch.tensor([[3, 2, 0, 1], [0, 1, 2, 9]])
    got = build_topk_mask(scores, centres, [4, 3], [2, 2], [5, 3], max_keep=3)
    assert got.kept_ids.tolist() == [[3, 1, -1], [1, 2, -1]]
    assert got.frame_mask.tolist() == [[False, True, True, False, False], [False, True, True, False, False]]
    assert got.token_offsets.tolist() == [[0, 2, 42, 82, 84, 86], [0, 2, 42, 82, 82, 82]]
    assert got.total_tokens.tolist() == [86, 82]


def test_kept_set_is_the_top_k_by_a_python_oracle():
    scores, centres, num_protos, num_keep, num_frames = random_batch(14, 12, 9, 20, tie_levels=3)
    got = build_topk_mask(scores, centres, num_protos, num_keep, num_frames, key_tokens=5, other_tokens=1)
    for b in range(12):
        L, K, T = int(num_protos[b]), int(num_keep[b]), int(num_frames[b])
        ranked = sorted(range(L), key=lambda i: (-float(scores[b, i]), i))[:K]
        kept = sorted(ranked, key=lambda i: (int(centres[b, i]), i))
        assert got.kept_ids[b].tolist() == kept + [-1] * (got.kept_ids.shape[1] - K)
        keyframes = {int(centres[b, i]) for i in kept}
        assert int(got.total_tokens[b]) == 5 * len(keyframes) + 1 * (T - len(keyframes))


def test_nan_ranks_last_when_unchecked():
    scores = torch.tensor([[float("nan"), 0.0, -1.0]])
    got = build_topk_mask(scores, torch.tensor([[0, 1, 2]]), [3], [2], [3], check=False)
    assert got.kept_ids.tolist() == [[1, 2]]


def test_reference_ranks_nan_like_the_compiled_paths_when_unchecked():
    g = torch.Generator().manual_seed(16)
    scores, centres, num_protos, num_keep, num_frames = random_batch(17, 10, 12, 30, tie_levels=4)
    scores[torch.rand(scores.shape, generator=g) < 0.3] = float("nan")
    scores[:, 0] = float("-inf")  # NaN ranks below -inf too
    args = (scores, centres, num_protos, num_keep, num_frames)
    got = build_topk_mask(*args, key_tokens=4, other_tokens=1, check=False)
    want = build_topk_mask_reference(*args, key_tokens=4, other_tokens=1, check=False)
    for name in ("kept_ids", "frame_mask", "token_offsets", "total_tokens"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    one = build_topk_mask_reference(torch.tensor([[float("nan"), float("-inf"), 2.0, float("nan")]]),
                                    torch.tensor([[0, 1, 2, 3]]), [3], [3], [4], check=False)
    assert one.kept_ids.tolist() == [[0, 1, 2]]  # padding (id 3) never kept ahead of a real NaN


def test_unchecked_garbage_counts_stay_in_bounds():
    g = torch.Generator().manual_seed(15)
    scores, centres = torch.randn(16, 6, generator=g), torch.randint(-50, 50, (16, 6), generator=g)
    counts = [torch.randint(-(2**31), 2**31 - 1, (16,), generator=g, dtype=torch.int64).to(torch.int32)
              for _ in range(3)]
    got = build_topk_mask(scores, centres, *counts, max_keep=4, max_frames=7, check=False)
    assert got.kept_ids.shape == (16, 4) and ((got.kept_ids >= -1) & (got.kept_ids < 6)).all()
    assert (got.token_offsets[:, -1] == got.total_tokens).all()


def _valid_inputs():
    scores = torch.randn(3, 5)
    centres = torch.tensor([[0, 1, 2, 3, 4], [7, 6, 5, 4, 3], [1, 3, 5, 7, 0]])
    return dict(scores=scores, centre_frames=centres, num_protos=torch.tensor([5, 5, 4]),
                num_keep=torch.tensor([4, 4, 3]), num_frames=torch.tensor([5, 8, 8]))


def _set(name, index, value):
    def mutate(inputs, options):
        inputs[name] = inputs[name].clone()
        inputs[name][index] = value
    return mutate


def _replace(name, make):
    def mutate(inputs, options):
        inputs[name] = make(inputs[name])
    return mutate


def _option(name, value):
    def mutate(inputs, options):
        options[name] = value
    return mutate


BAD_INPUTS = {
    "keep_more_than_protos": (_set("num_keep", 1, 6), "video 1: num_keep = 6 exceeds num_protos = 5"),
    "keep_zero": (_set("num_keep", 2, 0), "video 2: num_keep = 0 < 1"),
    "keep_negative": (_set("num_keep", 0, -2), "video 0: num_keep = -2 < 1"),
    "empty_video_keeps_one": (_set("num_protos", 2, 0), "video 2: num_keep = 3 but num_protos = 0"),
    "centre_at_num_frames": (
        _set("centre_frames", (0, 4), 5), r"video 0: centre_frames\[0, 4\] = 5 is outside \[0, num_frames = 5\)"),
    "centre_negative": (
        _set("centre_frames", (1, 2), -1), r"video 1: centre_frames\[1, 2\] = -1 is outside"),
    "nan_score": (_set("scores", (2, 3), float("nan")), r"video 2: scores\[2, 3\] is NaN"),
    "protos_beyond_columns": (_set("num_protos", 1, 6), r"video 1: num_protos = 6 is outside \[0, 5\]"),
    "negative_frames": (_set("num_frames", 0, -1), "video 0: num_frames = -1 is negative"),
    "frames_beyond_max_frames": (_option("max_frames", 6), "video 1: num_frames = 8 exceeds max_frames = 6"),
    "keep_beyond_max_keep": (_option("max_keep", 3), "video 0: num_keep = 4 exceeds max_keep = 3"),
    "centre_shape": (
        _replace("centre_frames", lambda c: c[:, :4]), r"centre_frames must be a tensor of the scores' shape \(3, 5\)"),
    "count_length": (
        _replace("num_keep", lambda k: k[:2]), r"num_keep must be an integer tensor of shape \[3\]"),
    "count_device": (_replace("num_frames", lambda t: t.to("meta")), "num_frames is on meta but scores is on cpu"),
    "centre_device": (
        _replace("centre_frames", lambda t: t.to("meta")), "centre_frames is on meta but scores is on cpu"),
    "float64_scores": (_replace("scores", lambda s: s.double()), "scores must be float32.*got torch.float64"),
    "integer_scores": (_replace("scores", lambda s: s.long()), "scores must be float32.*got torch.int64"),
    "float_centres": (_replace("centre_frames", lambda c: c.float()), "centre_frames must hold integer frame indices"),
    "bool_counts": (_replace("num_protos", lambda n: n > 0), "num_protos must be an integer tensor"),
    "scores_1d": (_replace("scores", lambda s: s[0]), r"scores must be a \[B, L_max\] tensor"),
    "negative_key_tokens": (_option("key_tokens", -1), r"key_tokens must be an int in \[0, 2147483647\], got -1"),
    "bool_other_tokens": (_option("other_tokens", True), "other_tokens must be an int"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_a_clear_error(case):
    mutate, message = BAD_INPUTS[case]
    inputs, options = _valid_inputs(), {}
    mutate(inputs, options)
    for build in (build_topk_mask, build_topk_mask_reference):
        with pytest.raises(ValueError, match=message):
            build(**inputs, **options)


def test_empty_video_and_empty_batch_are_allowed():
    inputs = _valid_inputs()
    inputs["num_protos"][2], inputs["num_keep"][2] = 0, 0
    got = build_topk_mask(**inputs)
    assert got.kept_ids[2].tolist() == [-1] * 4 and not got.frame_mask[2].any()
    assert got.total_tokens.tolist()[2] == 2 * 8
    empty = build_topk_mask(torch.empty(0, 4), torch.empty(0, 4, dtype=torch.int64), [], [], [])
    assert [tuple(t.shape) for t in empty] == [(0, 0), (0, 0), (0, 1), (0,)]


def test_wrong_out_buffer_is_rejected():
    inputs = _valid_inputs()
    out = poisoned_outputs(3, 4, 7, "cpu")  # max_frames is 8
    with pytest.raises(ValueError, match=r"out.frame_mask must be a contiguous torch.bool tensor of shape \(3, 8\)"):
        build_topk_mask(**inputs, out=out)


def test_missing_extension_tells_how_to_build(monkeypatch):
    monkeypatch.delattr(dynfocus_infer, "_csrc", raising=False)
    monkeypatch.setitem(sys.modules, "dynfocus_infer._csrc", None)
    with pytest.raises(ImportError, match="scripts/setup.sh"):
        build_topk_mask(**_valid_inputs())


def test_cuda_kernel_is_compiled_exactly_when_nvcc_is_available():
    nvcc_usable = shutil.which("nvcc") is not None and not os.environ.get("DYNFOCUS_NO_CUDA")
    assert ops.has_cuda_build() == nvcc_usable


@pytest.mark.gpu
def test_cuda_runs_on_the_current_stream():
    inputs = [t.cuda() for t in random_batch(16, 32, 50, 900)]
    want = build_topk_mask_reference(*inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = build_topk_mask(*inputs, max_keep=want.kept_ids.shape[1], max_frames=want.frame_mask.shape[1],
                              check=False)
    torch.cuda.current_stream().wait_stream(side)
    assert_same(got, want)


def test_bench_smoke_run_on_cpu_records_nothing(monkeypatch):
    results = BENCH_DIR / "results" / "topk_mask.csv"
    before = results.read_bytes() if results.exists() else None
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    bench = importlib.import_module("bench_topk_mask")
    rows = bench.main(["--device", "cpu", "--batch-sizes", "1,3", "--shapes", "5x9,7x7", "--repeats", "1"])
    assert [row["shape"] for row in rows] == ["B1xL5xT9", "B3xL5xT9", "B1xL7xT7", "B3xL7xT7"]
    assert all(row["ms_topk_mask"] > 0 and row["ms_reference"] > 0 for row in rows)
    assert (results.read_bytes() if results.exists() else None) == before


def test_bench_csv_rows_share_one_header(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    common = importlib.import_module("common")
    path = common.append_csv("demo", [{"shape": "a", "ms": 1.5}], results_dir=tmp_path)
    common.append_csv("demo", [{"shape": "b", "ms": 2.0}], results_dir=tmp_path)
    assert path.read_text().splitlines() == ["shape,ms", "a,1.5", "b,2.0"]
    with pytest.raises(ValueError, match="has columns"):
        common.append_csv("demo", [{"other": 1}], results_dir=tmp_path)
    assert re.search(r"ms\n.*1\.5", common.format_table([{"shape": "a", "ms": 1.5}], ["shape", "ms"]))
