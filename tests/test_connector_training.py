"""The trainable path: perturbed top-K (Berthet et al. 2020, paper Eqs. 6-7) and gradients through the connector."""
import pytest
import torch

from dynfocus_infer.config import ConnectorConfig
from dynfocus_infer.models.connector import DynFocusConnector
from dynfocus_infer.models.perturbed_topk import perturbed_topk

WIDTHS = dict(vision_width=32, llm_width=48, qformer_width=16)



def ragged_case(seed=0, samples=40):
    g = torch.Generator().manual_seed(seed)
    num_protos = torch.tensor([7, 3, 1, 6])
    num_keep = torch.tensor([5, 2, 1, 3])
    L = 7
    scores = torch.rand(4, L, generator=g, dtype=torch.float64)
    centres = torch.stack([torch.randperm(20, generator=g)[:L] for _ in range(4)])
    noise = torch.randn(4, samples, L, generator=g, dtype=torch.float64)
    return scores, num_protos, num_keep, centres, noise


def explicit_onehots(scores, num_protos, num_keep, centres, noise, sigma):
    """onehot[b][s] [K_max, L]: sample s's top-K_b of the valid prototypes, slots in centre-frame order."""
    B, n, L = noise.shape
    K_max = int(num_keep.max())
    result = torch.zeros(B, n, K_max, L, dtype=torch.float64)
    for b in range(B):
        Lb, Kb = int(num_protos[b]), int(num_keep[b])
        for s in range(n):
            perturbed = [float(scores[b, l] + sigma * noise[b, s, l]) for l in range(Lb)]
            best = sorted(range(Lb), key=lambda l: -perturbed[l])[:Kb]
            for k, l in enumerate(sorted(best, key=lambda l: (int(centres[b, l]), l))):
                result[b, s, k, l] = 1.0
    return result


def test_perturbed_topk_forward_is_the_mean_indicator():
    scores, num_protos, num_keep, centres, noise = ragged_case()
    indicator = perturbed_topk(scores, num_protos, num_keep, centres, max_keep=5, sigma=0.1, noise=noise)
    expected = explicit_onehots(scores, num_protos, num_keep, centres, noise, 0.1).mean(dim=1)
    torch.testing.assert_close(indicator, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(indicator.sum(-1), (torch.arange(5) < num_keep[:, None]).double())


@pytest.mark.parametrize("jacobian", ["full", "diagonal"])
def test_perturbed_topk_backward_matches_the_monte_carlo_jacobian(jacobian):
    scores, num_protos, num_keep, centres, noise = ragged_case(seed=1)
    scores.requires_grad_(True)
    sigma, n = 0.3, noise.shape[1]
    indicator = perturbed_topk(scores, num_protos, num_keep, centres, max_keep=5, sigma=sigma, noise=noise,
                               jacobian=jacobian)
    upstream = torch.randn_like(indicator)
    (grad,) = torch.autograd.grad(indicator, scores, upstream)
    onehots = explicit_onehots(scores.detach(), num_protos, num_keep, centres, noise, sigma)
    if jacobian == "full":   # Eq. 7: dP[k, l] / ds[e] = E[onehot[k, l] Z[e]] / sigma
        jac = torch.einsum("bskl,bse->bkle", onehots, noise) / (n * sigma)
        expected = torch.einsum("bkl,bkle->be", upstream, jac)
    else:                    # official PerturbedTopKFunction.backward: einsum("bnkd,bnd->bkd")
        expected_gradient = torch.einsum("bnkd,bnd->bkd", onehots, noise) / n / sigma
        expected = torch.einsum("bkd,bkd->bd", upstream, expected_gradient)
    valid = torch.arange(7) < num_protos[:, None]
    expected = torch.where(valid, expected, torch.zeros_like(expected))
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert grad.abs().sum() > 0


def test_small_sigma_indicator_is_the_hard_topk_in_centre_order():
    scores, num_protos, num_keep, centres, noise = ragged_case(seed=2)
    indicator = perturbed_topk(scores.float(), num_protos, num_keep, centres, max_keep=5, sigma=1e-7,
                               noise=noise.float())
    for b in range(4):
        Lb, Kb = int(num_protos[b]), int(num_keep[b])
        kept = sorted(range(Lb), key=lambda l: -float(scores[b, l]))[:Kb]
        kept = sorted(kept, key=lambda l: int(centres[b, l]))
        assert indicator[b, :Kb].argmax(-1).tolist() == kept
        assert (indicator[b, :Kb].max(-1).values == 1).all() and (indicator[b, Kb:] == 0).all()


def training_case(backend="reference", frames=(9, 1, 4), seed=0, **switches):
    torch.manual_seed(seed)
    config = ConnectorConfig(**WIDTHS, patch_grid=8, num_events=6, perturb_samples=64, **switches)
    connector = DynFocusConnector(config, cluster_backend=backend).train()
    patches = torch.randn(sum(frames), 64, 32, requires_grad=True)
    q_emb = torch.randn(sum(frames), 32, 32)
    return connector, patches, q_emb, list(frames)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_training_loss_reaches_scorer_projectors_and_frames(backend):
    connector, patches, q_emb, frames = training_case(backend)
    out = connector(patches, q_emb, frames)
    assert out.indicator is not None and out.indicator.shape == (3, 5, 6)  # K = round(0.8 * 6) = 5
    target = torch.randn_like(out.tokens)
    ((out.tokens - target) ** 2).mean().backward()
    for name, module in [("scorer", connector.event_scorer), ("mm_projector", connector.mm_projector),
                         ("key", connector.vlm_att_key_projector), ("val", connector.vlm_att_val_projector)]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert connector.merge.score.weight.grad.abs().sum() > 0
    assert torch.isfinite(patches.grad).all() and patches.grad.abs().sum() > 0


def test_training_layout_equals_inference_layout():
    connector, patches, q_emb, frames = training_case(seed=1)
    trained = connector(patches, q_emb, frames)
    with torch.no_grad():
        inferred = connector.eval()(patches, q_emb, frames)
    assert trained.num_tokens == inferred.num_tokens
    assert torch.equal(trained.keyframes, inferred.keyframes)
    # Rods do not depend on the indicator: every non-key frame's tokens are the same in both modes.
    start = 0
    for b, T in enumerate(frames):
        for t in range(T):
            if not inferred.frame_mask[b, t]:
                row = start + int(inferred.frame_token_offsets[b, t])
                torch.testing.assert_close(trained.tokens[row:row + 2], inferred.tokens[row:row + 2])
        start += inferred.num_tokens[b]


def test_a_few_optimiser_steps_lower_a_simple_loss():
    connector, patches, q_emb, frames = training_case(seed=2)
    patches = patches.detach()
    optimiser = torch.optim.Adam(connector.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        optimiser.zero_grad()
        loss = connector(patches, q_emb, frames).tokens.pow(2).mean()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_without_cones_the_scorer_gets_no_gradient():
    # cone_mode "coarse": keyframes carry rods only, so nothing the indicator could weigh reaches the tokens.
    connector, patches, q_emb, frames = training_case(seed=3, cone_mode="coarse")
    out = connector(patches, q_emb, frames)
    assert out.indicator is None
    out.tokens.sum().backward()
    assert all(p.grad is None for p in connector.event_scorer.parameters())
