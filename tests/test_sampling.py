"""Sampling: greedy, the sampled distribution, batch invariance, filters, and parameter errors."""
import pytest
import torch

from dynfocus_infer.errors import RequestError
from dynfocus_infer.sampling import BatchSampler, SamplingParams, gumbel_noise


def test_greedy_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    sampler = BatchSampler([SamplingParams()] * 6, torch.device("cpu"))
    assert torch.equal(sampler(logits, torch.zeros(6, dtype=torch.int64)), logits.argmax(-1))


def test_sampled_frequencies_follow_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 6000
    params = [SamplingParams(temperature=0.7, seed=s) for s in range(n)]
    sampler = BatchSampler(params, torch.device("cpu"))
    tokens = sampler(logits.expand(n, 5), torch.zeros(n, dtype=torch.int64))
    freq = torch.bincount(tokens, minlength=5).float() / n
    expected = (logits / 0.7).softmax(-1)
    assert (freq - expected).abs().max() < 0.025, (freq, expected)


def test_a_request_draws_the_same_tokens_alone_or_batched():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 300, generator=g)
    logits[3] = logits[0]
    params = [SamplingParams(temperature=1.0, seed=s, top_p=0.9, top_k=k) for s, k in ((3, 0), (4, 20), (5, 5), (3, 0))]
    steps = torch.tensor([0, 7, 2, 0])
    batched = BatchSampler(params, torch.device("cpu"))(logits, steps)
    alone = [BatchSampler([p], torch.device("cpu"))(logits[i:i + 1], steps[i:i + 1]).item() for i, p in enumerate(params)]
    assert batched.tolist() == alone
    assert batched[0] == batched[3], "same seed, step and logits must give the same token"


def test_noise_changes_with_seed_and_step():
    a = gumbel_noise(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 64)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert torch.isfinite(a).all()


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0, -10.0]]).expand(500, 6)
    steps = torch.zeros(500, dtype=torch.int64)
    top2 = BatchSampler([SamplingParams(temperature=5.0, top_k=2, seed=s) for s in range(500)], torch.device("cpu"))
    assert set(top2(logits, steps).tolist()) == {0, 1}
    nucleus = BatchSampler([SamplingParams(temperature=1.0, top_p=0.5, seed=s) for s in range(500)],
                           torch.device("cpu"))
    assert set(nucleus(logits, steps).tolist()) == {0}


def test_top_p_one_keeps_the_tail_whatever_the_neighbours_ask():
    """Row 0 (top_p 1, top_k 0: no filter) must draw as it would alone, even though row 1's filter sends the batch
    through the filtering path: with a long flat tail the fp32 cumulative mass reaches 1 before the tail ends."""
    vocab = 50000
    logits = torch.full((2, vocab), -12.0)
    logits[:, 0] = 8.0
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, top_p=0.9, seed=2)]
    steps = torch.zeros(2, dtype=torch.int64)
    from dynfocus_infer.sampling import _filter_top_k_top_p

    kept = _filter_top_k_top_p(logits, torch.tensor([0, 0]), torch.tensor([1.0, 0.9]))
    assert torch.isfinite(kept[0]).all(), "top_p = 1 dropped tokens"
    assert torch.isfinite(kept[1]).sum() == 1
    for seed in range(30):
        params[0].seed = seed
        batched = BatchSampler(params, torch.device("cpu"))(logits, steps)[0]
        alone = BatchSampler(params[:1], torch.device("cpu"))(logits[:1], steps[:1])[0]
        assert batched == alone


@pytest.mark.parametrize("kwargs,field", [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
                                          (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
                                          (dict(seed=-1), "seed"), (dict(stop=[""]), "stop"),
                                          (dict(max_tokens=True), "max_tokens"),
                                          (dict(temperature="0.5"), "temperature"), (dict(top_p=None), "top_p"),
                                          (dict(top_k=2.0), "top_k"), (dict(seed=True), "seed"),
                                          (dict(stop=5), "stop"), (dict(stop_token_ids=[1, "2"]), "stop_token_ids"),
                                          (dict(stop_token_ids=3), "stop_token_ids"),
                                          (dict(ignore_eos="yes"), "ignore_eos"),
                                          (dict(temperature=float("inf")), "temperature"),
                                          (dict(temperature=float("nan")), "temperature"),
                                          (dict(top_p=float("nan")), "top_p")])
def test_bad_sampling_params_are_named(kwargs, field):
    with pytest.raises(RequestError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_none_means_no_stop_strings_or_ids():
    params = SamplingParams(stop=None, stop_token_ids=None, temperature=1)
    assert params.stop == [] and params.stop_token_ids == [] and params.temperature == 1
    assert SamplingParams(stop="###", stop_token_ids=(5, 6)).stop_token_ids == [5, 6]


def test_numpy_numbers_are_accepted_as_python_numbers():
    import numpy as np

    from dynfocus_infer.outputs import Request

    params = SamplingParams(max_tokens=np.int64(4), temperature=np.float32(0.5), top_k=np.int32(3), seed=np.int64(2),
                            stop_token_ids=[np.int64(7)])
    assert (params.max_tokens, params.temperature, params.top_k, params.seed, params.stop_token_ids) == (4, 0.5, 3, 2,
                                                                                                         [7])
    assert all(type(v) is int for v in (params.max_tokens, params.top_k, params.seed, params.stop_token_ids[0]))
    request = Request("q?", num_frames=np.int64(8))
    assert request.num_frames == 8 and type(request.num_frames) is int
    assert Request("q?", fps=np.float32(0.5)).fps == 0.5
    with pytest.raises(RequestError, match="num_frames"):
        Request("q?", num_frames=True)
