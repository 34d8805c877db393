"""Training the visual path (issue 17) on the tiny preset: the loss falls when overfitting a few videos, gradients
reach the ViT, Q-Former, connector and scorer but not the LLM, a resumed run equals an uninterrupted one, and the
same seed gives the same losses."""
import json

import pytest
import torch

import dynfocus_kernels
from dynfocus_kernels.common import interpreter_active
from dynfocus_infer.models.connector_parts import cluster_ops
from dynfocus_infer.cli import main
from dynfocus_infer.training import TrainConfig, prepare_model, train
from dynfocus_infer.training.data import training_batch
from dynfocus_infer.training.loss import batch_loss

# The plain-torch DPC-KNN keeps these runs fast under TRITON_INTERPRET=1; the gradient test runs the Triton kernels'
# autograd path (the engine's "auto" backend under the interpreter or on CUDA).
TINY = dict(model="tiny", batch_size=2, num_frames=4, lr=1e-2, warmup_steps=0, cluster_backend="reference",
            probe_videos=1)  # the patch probe (patch_weight 1) is on by default


def config(tmp_path, name, **overrides):
    return TrainConfig(out=str(tmp_path / name), **{**TINY, **overrides})


def test_gradients_reach_the_visual_path_and_not_the_llm(tmp_path):
    cfg = config(tmp_path, "g", cluster_backend="auto")
    loaded = prepare_model(cfg)
    model = loaded.model
    if interpreter_active():
        assert cluster_ops("auto", torch.device("cpu")) is dynfocus_kernels
    assert model.connector.training and not model.llm.training
    examples = training_batch(0, 0, 2, 4, model.config.vit.image_size)
    result = batch_loss(loaded, examples)
    result.loss.backward()
    assert torch.isfinite(result.loss) and result.loss.item() > 1.0
    for name, parameter in [("vit.patch_embed", model.vit.patch_embed.proj.weight),
                            ("vit.blocks.0", model.vit.blocks[0].mlp.fc1.weight),
                            ("qformer.query", model.qformer.vlm_att_query),
                            ("connector.mm_projector", model.connector.mm_projector[0].weight),
                            ("connector.val_projector", model.connector.vlm_att_val_projector.weight),
                            ("scorer", model.connector.event_scorer.out_conv[4].weight)]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in model.llm.parameters())


def test_loss_falls_when_overfitting_a_few_videos(tmp_path):
    result = train(config(tmp_path, "o", steps=20, num_videos=2, checkpoint_every=20, probe_videos=0,
                          probe_weight=0.0, patch_weight=0.0), progress=False)
    losses = [row["answer"] for row in result["losses"]]
    assert all(abs(row["loss"] - row["answer"] - row["norm"]) < 1e-5 for row in result["losses"])
    assert len(losses) == 20
    # The same two examples every step (num_videos=2): the loss must fall steadily, not drift.
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.85 * first, losses
    assert min(losses) in losses[-4:] and sum(b < a for a, b in zip(losses, losses[1:])) >= 16, losses


def test_resumed_run_equals_the_uninterrupted_run_and_seeds_repeat(tmp_path):
    whole = train(config(tmp_path, "whole", steps=3, checkpoint_every=3), progress=False)
    def interrupt_after_two(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # as Ctrl-C would: the checkpoint of step 2 is written on the way out
        train(config(tmp_path, "parts", steps=3, checkpoint_every=5), progress=False, on_step=interrupt_after_two)
    assert torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=False)["step"] == 2
    resumed = train(config(tmp_path, "parts", steps=3, checkpoint_every=5), resume=True, progress=False)
    assert resumed["losses"] == whole["losses"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 3
    for key, tensor in a["visual"].items():
        assert torch.equal(tensor, b["visual"][key]), key
    again = train(config(tmp_path, "again", steps=3, checkpoint_every=3), progress=False)
    assert again["losses"] == whole["losses"]
    other = train(config(tmp_path, "other", steps=3, checkpoint_every=3, seed=1), progress=False)
    assert other["losses"] != whole["losses"]
    logged = [json.loads(line) for line in (tmp_path / "parts" / "losses.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in row.items() if k != "step"} for row in logged] == whole["losses"]
    assert all(row["probe"] > 0 and row["patch"] > 0 for row in logged)
    for part in ("probe", "patch_probe"):
        for key, tensor in a[part].items():
            assert torch.equal(tensor, b[part][key]), (part, key)
    assert (tmp_path / "whole" / "visual.safetensors").stat().st_size > 0


def test_resume_refuses_other_settings_and_a_second_start(tmp_path):
    train(config(tmp_path, "r", steps=1), progress=False)
    with pytest.raises(Exception, match="batch_size"):
        train(config(tmp_path, "r", steps=2, batch_size=3), resume=True, progress=False)
    with pytest.raises(Exception, match="already holds a checkpoint"):
        train(config(tmp_path, "r", steps=2), progress=False)


def test_segments_record_each_command_that_trained_the_run(tmp_path):
    def segments(name):
        return torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["config"]["segments"]

    train(config(tmp_path, "s", steps=1), progress=False)
    assert segments("s") == [{"from_step": 0, "steps": 1}]
    train(config(tmp_path, "s", steps=1), resume=True, progress=False)  # the same --steps: the same segment
    assert segments("s") == [{"from_step": 0, "steps": 1}]
    train(config(tmp_path, "s", steps=2), resume=True, progress=False)  # a longer schedule: a second segment
    assert segments("s") == [{"from_step": 0, "steps": 1}, {"from_step": 1, "steps": 2}]
    written = json.loads((tmp_path / "s" / "visual_config.json").read_text())["training"]["segments"]
    assert written == segments("s")
    # A checkpoint written before segments were recorded: its own --steps was the first segment.
    path = tmp_path / "s" / "checkpoint.pt"
    payload = torch.load(path, weights_only=False)
    for key in ("segments", "visual_encoder", "probe_norm"):  # nor the encoder (DynFocus) or the probe norm (layer)
        del payload["config"][key]
    torch.save(payload, path)
    with pytest.raises(Exception, match="probe_norm 'layer' there, 'batch' here"):
        train(config(tmp_path, "s", steps=3), resume=True, progress=False)
    train(config(tmp_path, "s", steps=3, probe_norm="layer"), resume=True, progress=False)
    assert segments("s") == [{"from_step": 0, "steps": 2}, {"from_step": 2, "steps": 3}]


@pytest.mark.parametrize("encoder,per_frame,trains_qformer", [("llama-vid", 2, True), ("pool-2x2", 4, False),
                                                             ("full", None, False)])
def test_a_baseline_trains_for_its_own_token_layout(tmp_path, encoder, per_frame, trains_qformer):
    """--visual-encoder: the baseline makes the visual tokens of the answer loss (its own count per frame), its
    parameters (the connector's projectors, the ViT, the Q-Former where it reads it) get gradients, and the run
    records the encoder (a resume with another one is refused)."""
    from dynfocus_infer.training.trainer import visual_encoder

    cfg = config(tmp_path, encoder, steps=1, visual_encoder=encoder, probe_videos=0, probe_weight=0.0)
    loaded = prepare_model(cfg)
    model = loaded.model
    examples = training_batch(0, 0, 2, 4, model.config.vit.image_size)
    result = batch_loss(loaded, examples, encoder=visual_encoder(model, encoder))
    per_frame = per_frame or model.config.connector.patch_grid ** 2   # full: every patch token of every frame
    assert result.visual_tokens == (4 * per_frame, 4 * per_frame)
    result.loss.backward()
    assert torch.isfinite(result.loss)
    assert model.connector.mm_projector[0].weight.grad.abs().sum() > 0
    assert model.vit.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert (model.qformer.vlm_att_query.grad is not None) == trains_qformer
    assert model.connector.event_scorer.out_conv[4].weight.grad is None   # no events: the scorer is not used
    train(cfg, progress=False)
    written = json.loads((tmp_path / encoder / "visual_config.json").read_text())["training"]
    assert written["visual_encoder"] == encoder
    with pytest.raises(Exception, match="visual_encoder"):
        train(config(tmp_path, encoder, steps=2, probe_videos=0, probe_weight=0.0), resume=True, progress=False)
    with pytest.raises(Exception, match="'bogus' is unknown"):
        train(config(tmp_path, "bogus", visual_encoder="bogus"), progress=False)


def test_train_command_trains_and_rejects_bad_input(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["train", "--out", out, "--model", "tiny", "--steps", "1", "--batch-size", "1", "--frames", "4"]) == 0
    assert "trained to step 1" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "none"), "--model", "tiny", "--resume"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--out", out, "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--out", out, "--probe-norm", "group"])
    assert stopped.value.code == 2 and "invalid choice: 'group'" in capsys.readouterr().err
    written = json.loads((tmp_path / "cli" / "visual_config.json").read_text())["training"]
    assert written["probe_norm"] == "batch"


def test_training_forward_of_the_llm_equals_its_inference_prefill(tmp_path):
    llm = prepare_model(config(tmp_path, "p")).model.llm
    embeds = torch.randn(11, llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    cu_seqlens = torch.tensor([0, 4, 11], dtype=torch.int32)
    trained = llm.logits(llm.forward_packed(embeds, cu_seqlens, 7))
    served = llm.prefill(cu_seqlens, 7, inputs_embeds=embeds, all_logits=True)
    torch.testing.assert_close(trained, served, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_scene_probe_reads_a_small_signal_under_a_large_shared_component_only_when_centred(norm):
    """Tokens as the trained connector makes them (README, issue 17): a component shared by every video (norm 80)
    far larger than what carries the label (norm 4, on 8 of a video's 48 tokens) plus noise. The batch-normalised
    probe learns the colours; the per-token LayerNorm of runs 1-3 stays near its prior (about 0.6 here)."""
    from dynfocus_infer.training.probe import SceneProbe

    generator = torch.Generator().manual_seed(0)
    width, videos, per_video = 96, 12, 48
    shared = torch.randn(width, generator=generator)
    shared = 80 * shared / shared.norm()
    signal = torch.randn(6, width, generator=generator)
    signal = 4 * signal / signal.norm(dim=1, keepdim=True)
    torch.manual_seed(0)
    probe = SceneProbe(width, width=64, norm=norm)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3)
    losses = []
    for _ in range(250):
        labels = (torch.rand(videos, 6, generator=generator) < 0.3).float()
        tokens = shared + 0.2 * torch.randn(videos, per_video, width, generator=generator)
        tokens[:, :8] += (labels @ signal)[:, None]
        logits = probe(tokens.flatten(0, 1), [per_video] * videos)["colours"]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    final = sum(losses[-20:]) / 20
    if norm == "batch":
        assert final < 0.05, final
    else:
        assert final > 0.4, final
    with pytest.raises(ValueError, match="probe norm 'group' is unknown"):
        SceneProbe(width, norm="group")


def test_scene_probe_labels_read_the_scene():
    from dynfocus_infer.synthetic import sample_clip
    from dynfocus_infer.training.probe import COLOUR_NAMES, DIRECTION_NAMES, NO_BRIEF, SHAPES, scene_targets

    seen_brief = seen_none = 0
    for index in range(40):
        scene = sample_clip(3, index, 4).scene
        targets = scene_targets(scene)
        assert targets["count"].item() == len(scene.shapes) - 1
        assert {COLOUR_NAMES[i] for i in targets["colours"].nonzero().flatten().tolist()} == \
            {s.colour for s in scene.shapes}
        pairs = targets["pairs"].nonzero().flatten().tolist()
        assert sorted(pairs) == sorted(SHAPES.index(s.kind) * 6 + COLOUR_NAMES.index(s.colour) for s in scene.shapes)
        for s in scene.shapes:
            pair = SHAPES.index(s.kind) * 6 + COLOUR_NAMES.index(s.colour)
            assert DIRECTION_NAMES[targets["directions"][pair]] == s.direction
        assert (targets["directions"] >= 0).sum().item() == len(scene.shapes)
        if scene.brief_index is None:
            seen_none += 1
            assert targets["brief"].item() == NO_BRIEF
        else:
            seen_brief += 1
            assert COLOUR_NAMES[targets["brief"]] == scene.shapes[scene.brief_index].colour
    assert seen_brief and seen_none


def test_probe_and_scale_penalty_train_the_visual_path_without_the_llm(tmp_path):
    """Probe-only examples (answered=0 of them reach the LLM) still give the ViT, Q-Former and connector gradients;
    the scale penalty is zero for tokens at the LLM's own embedding scale and grows past NORM_SLACK times it."""
    from dynfocus_infer.training.loss import NORM_SLACK, _scale_penalty
    from dynfocus_infer.training.probe import PatchProbe, SceneProbe

    loaded = prepare_model(config(tmp_path, "probe"))
    model = loaded.model
    probe = SceneProbe(model.config.connector.llm_width)
    patch_probe = PatchProbe(model.config.vit.width)
    examples = training_batch(0, 0, 1, 4, model.config.vit.image_size, probe_videos=2,
                              patch_grid=model.config.connector.patch_grid)
    assert len(examples) == 3
    result = batch_loss(loaded, examples, answered=1, probe=probe, norm_weight=1.0, patch_probe=patch_probe)
    result.loss.backward()
    assert result.probe > 0 and result.patch > 0 and result.per_example.shape == (1,)
    assert abs(result.loss.item() - (result.answer + result.probe + result.patch + result.norm)) < 1e-4
    assert patch_probe.colour.weight.grad.abs().sum() > 0
    for name, parameter in [("vit", model.vit.patch_embed.proj.weight), ("qformer", model.qformer.vlm_att_query),
                            ("connector", model.connector.mm_projector[0].weight),
                            ("probe", probe.count.weight)]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    tokens = torch.randn(50, 64)
    rms = tokens.pow(2).mean(-1).sqrt()
    assert _scale_penalty(tokens, rms.max().item()) == 0
    big = _scale_penalty(tokens * 4 * NORM_SLACK, rms.min().item())
    assert big > _scale_penalty(tokens * 2 * NORM_SLACK, rms.min().item()) > 0


def test_patch_labels_mark_the_patches_each_visible_shape_covers():
    """Against a per-pixel rendering: a patch labelled with a shape's colour and kind holds that shape's pixels in the
    model's square, a shape visible in a frame labels at least one patch, and the background patches hold none."""
    from dynfocus_infer.synthetic import sample_clip
    from dynfocus_infer.synthetic.render import shape_mask
    from dynfocus_infer.training.probe import COLOUR_NAMES, SHAPES, patch_targets

    grid = 8
    for index in range(12):
        clip = sample_clip(4, index, 5)
        scene = clip.scene
        colour, kind = patch_targets(scene, clip.frame_indices, grid)
        assert colour.shape == kind.shape == (5, grid * grid)
        assert torch.equal(colour > 0, kind > 0)
        left, top, side = scene.square
        step = side / grid
        for row, frame in enumerate(clip.frame_indices.tolist()):
            for i, shape in enumerate(scene.shapes):
                label = 1 + COLOUR_NAMES.index(shape.colour)  # two shapes may share a colour, not a kind too
                ours = (colour[row] == label) & (kind[row] == 1 + SHAPES.index(shape.kind))
                patches = ours.nonzero().flatten().tolist()
                assert bool(patches) == scene.visible(i, frame), (index, frame, i)
                for patch in patches:  # a labelled patch holds pixels of its shape
                    y, x = divmod(patch, grid)
                    xs = left + x * step + (torch.arange(16).double().numpy()[None, :] + 0.5) * step / 16
                    ys = top + y * step + (torch.arange(16).double().numpy()[:, None] + 0.5) * step / 16
                    assert shape_mask(shape, frame, xs, ys).any(), (index, frame, i, patch)
