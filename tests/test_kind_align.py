"""The kind-aligned spatial prototypes (training/loss.kind_loss, `train --kind-weight`): the label of each row of G_t
from the patch labels (models/spatial_merger.grouped_patch_labels) against a loop over the merger's own layout, on
random clusterings and on a merger run over patches whose features say their label; the loss against its
definition; where its gradient goes; the settings that refuse it."""
import pytest
import torch

from dynfocus_infer.config import ConnectorConfig
from dynfocus_infer.errors import ConfigError
from dynfocus_infer.models.spatial_merger import SpatialMerger, grouped_patch_labels
from dynfocus_infer.training import TrainConfig, prepare_model, train
from dynfocus_infer.training.data import example
from dynfocus_infer.training.loss import KIND_WORDS, align_word_ids, batch_loss, kind_loss, word_alignment

TINY = dict(model="tiny", batch_size=2, num_frames=4, lr=1e-2, warmup_steps=0, cluster_backend="reference",
            probe_videos=1)
IGNORE = -100


def labels_by_loops(labels, first_assignment, second_of_first, c2, num_labels, min_share):
    """G_t's rows in the merger's documented order (for each layer-2 cluster v: Z2[v], then its Z1 tokens by
    index), each labelled by counting its patches."""
    out = []
    for t in range(labels.shape[0]):
        rows = []
        for v in range(c2):
            members = [j for j in range(second_of_first.shape[1]) if second_of_first[t, j] == v]
            rows.append(members)                # Z2[v] covers the patches of all its Z1 tokens
            rows += [[j] for j in members]
        frame = []
        for clusters in rows:
            patches = [labels[t, n].item() for n in range(labels.shape[1]) if first_assignment[t, n].item() in clusters]
            counts = [patches.count(k) for k in range(num_labels)]
            best = max(range(num_labels), key=lambda k: counts[k])
            frame.append(best if patches and counts[best] > min_share * len(patches) else IGNORE)
        out.append(frame)
    return torch.tensor(out)


@pytest.mark.parametrize("T,N,c1,c2,num_labels,min_share", [(5, 64, 6, 2, 4, 0.5), (3, 49, 7, 3, 2, 0.5),
                                                           (4, 30, 5, 1, 5, 0.3), (2, 17, 16, 6, 3, 0.5)])
def test_labels_of_grouped_rows_match_a_loop_over_the_layout(T, N, c1, c2, num_labels, min_share):
    g = torch.Generator().manual_seed(T * 1000 + N)
    for trial in range(4):
        first_assignment = torch.randint(0, c1, (T, N), generator=g)
        second_of_first = torch.randint(0, c2, (T, c1), generator=g)
        # Few distinct labels make ties and exact halves common; trial 0 is all one label.
        labels = torch.randint(0, num_labels if trial else 1, (T, N), generator=g)
        got = grouped_patch_labels(labels, first_assignment, second_of_first, c2, num_labels, min_share=min_share)
        assert got.shape == (T, c1 + c2)
        assert got.tolist() == labels_by_loops(labels, first_assignment, second_of_first, c2, num_labels,
                                               min_share).tolist()
        if trial == 0:
            has_patches = torch.stack([torch.isin(torch.arange(c1), first_assignment[t]) for t in range(T)])
            assert (got == 0).sum() >= has_patches.sum()  # every Z1 token that has patches, and its Z2


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_labels_follow_the_rows_the_merger_emits(backend):
    """Patches whose feature is their label's own direction (plus noise): each labelled row of G_t, divided by its
    modulation, is nearest to its label's direction, through both clustering backends."""
    config = ConnectorConfig(vision_width=32, patch_grid=8, spatial_centers=(6, 2), spatial_k=(5, 3))
    merger = SpatialMerger(config, cluster_backend=backend)
    g = torch.Generator().manual_seed(3)
    num_labels, T, N = 4, 6, 64
    directions = torch.randn(num_labels, 32, generator=g) * 4
    labels = torch.zeros(T, N, dtype=torch.int64)
    for t in range(T):  # a background and up to three blobs of 4-9 patches
        grid = labels[t].view(8, 8)
        for k in range(1, 1 + t % 4):
            r, c = torch.randint(0, 5, (2,), generator=g).tolist()
            h, w = torch.randint(2, 4, (2,), generator=g).tolist()
            grid[r:r + h, c:c + w] = k
    patches = directions[labels] + 0.05 * torch.randn(T, N, 32, generator=g)
    with torch.no_grad():
        out = merger.prototypes(patches)
    got = grouped_patch_labels(labels, out.first_assignment, out.second_of_first, 2, num_labels)
    assert (got >= 0).sum() >= T * 4 and (got > 0).any()
    order_cluster = [[v for v in range(2) for _ in range(1 + int((out.second_of_first[t] == v).sum()))]
                     for t in range(T)]
    scale = out.modulation.gather(1, torch.tensor(order_cluster))
    rows = out.grouped / scale[..., None]
    for t in range(T):
        for i in range(rows.shape[1]):
            if got[t, i] < 0:
                continue
            nearest = (rows[t, i][None] - directions).norm(dim=-1).argmin().item()
            if got[t, i] > 0 or i in _first_layer_rows(out.second_of_first[t]):
                assert nearest == got[t, i].item(), (t, i)


def _first_layer_rows(second_of_first):
    """Row indices of G_t that hold Z1 tokens (a Z2 row mixes its Z1 tokens, so its mean can sit between labels)."""
    rows, i = [], 0
    for v in range(2):
        i += 1
        members = int((second_of_first == v).sum())
        rows += list(range(i, i + members))
        i += members
    return rows


def test_word_alignment_is_low_only_at_the_right_words_embedding():
    from dynfocus_infer.presets import load_model

    loaded = load_model("tiny", device=torch.device("cpu"), dtype=torch.float32)
    ids = align_word_ids(loaded, KIND_WORDS)
    assert len(set(ids)) == len(KIND_WORDS) == 3
    words = loaded.model.llm.model.embed_tokens.weight.detach()[torch.tensor(ids)]
    target = torch.tensor([0, 2, 1, 1, 0])
    right = word_alignment(loaded, words[target], KIND_WORDS, target).item()
    wrong = word_alignment(loaded, words[(target + 1) % 3], KIND_WORDS, target).item()
    scaled = word_alignment(loaded, 3 * words[target], KIND_WORDS, target).item()
    assert 0 <= right < 0.1 and wrong > 2.0 and scaled > right + 0.5


def _shape_examples(image_size, grid, want=3):
    found = [example(7, i, 4, image_size, grid) for i in range(want)]
    assert all(bool((e.targets["patch_kind"] > 0).any()) for e in found)
    return found


def test_kind_loss_is_its_definition_and_trains_the_cone_path(tmp_path):
    loaded = prepare_model(TrainConfig(out=str(tmp_path / "k"), **TINY))
    model = loaded.model
    config = model.config.connector
    examples = _shape_examples(model.config.vit.image_size, config.patch_grid)
    patch = model.vit(torch.cat([e.pixels for e in examples]))[:, 1:]
    loss = kind_loss(loaded, patch, examples)
    with torch.no_grad():  # by hand: the merger's rows, labelled by loops, through mm_projector
        spatial = model.connector.merge.prototypes(patch)
        kinds = torch.cat([e.targets["patch_kind"] for e in examples])
        labels = labels_by_loops(kinds, spatial.first_assignment, spatial.second_of_first, config.spatial_centers[1],
                                 1 + len(KIND_WORDS), 0.5)
        shaped = labels > 0
        assert shaped.any() and (labels == 0).any()
        expected = word_alignment(loaded, model.connector.mm_projector(spatial.grouped[shaped]), KIND_WORDS,
                                  labels[shaped] - 1)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    for name, parameter in [("vit", model.vit.patch_embed.proj.weight),
                            ("mm_projector", model.connector.mm_projector[0].weight),
                            ("merge.score", model.connector.merge.score.weight)]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for name, parameter in [("val_projector", model.connector.vlm_att_val_projector.weight),
                            ("qformer", model.qformer.vlm_att_query)]:
        assert parameter.grad is None or not parameter.grad.any(), name
    # No shape in any patch: nothing to align.
    blank = [type(e)(**{**e.__dict__, "targets": {**e.targets, "patch_kind": torch.zeros_like(
        e.targets["patch_kind"])}}) for e in examples]
    assert kind_loss(loaded, patch.detach(), blank).item() == 0


def test_batch_loss_adds_the_kind_loss(tmp_path):
    loaded = prepare_model(TrainConfig(out=str(tmp_path / "b"), **TINY))
    model = loaded.model
    examples = _shape_examples(model.config.vit.image_size, model.config.connector.patch_grid, want=2)
    torch.manual_seed(0)
    result = batch_loss(loaded, examples, answered=1, kind_weight=2.0)
    assert result.kind > 0 and result.align == 0
    assert abs(result.loss.item() - result.answer - 2.0 * result.kind) < 1e-4


def test_kind_weight_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="--kind-weight"):
        TrainConfig(out=str(tmp_path / "x"), kind_weight=-1.0)
    for encoder in ("llama-vid", "pool-2x2", "dynfocus-L6-r0.33"):
        with pytest.raises(ConfigError, match="spatial prototypes"):
            TrainConfig(out=str(tmp_path / "x"), kind_weight=1.0, visual_encoder=encoder)
    train(TrainConfig(out=str(tmp_path / "r"), steps=1, **TINY), progress=False)
    with pytest.raises(ConfigError, match="kind_weight"):
        train(TrainConfig(out=str(tmp_path / "r"), steps=2, kind_weight=1.0, **TINY), resume=True, progress=False)
    # The patch labels are made for the kind loss even without the patch probe.
    result = train(TrainConfig(out=str(tmp_path / "w"), steps=2, kind_weight=1.0, patch_weight=0.0,
                               checkpoint_every=1, **TINY), progress=False)
    assert all(row["kind"] >= 0 for row in result["losses"]) and any(row["kind"] > 0 for row in result["losses"])
    assert all(row["patch"] == 0 for row in result["losses"])
