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
TINY = dict(model="tiny", batch_size=2, num_frames=4, lr=1e-2, warmup_steps=0, cluster_backend="reference")


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
    result = train(config(tmp_path, "o", steps=20, num_videos=2, checkpoint_every=20), progress=False)
    losses = result["losses"]
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
    assert [row["loss"] for row in logged] == whole["losses"]
    assert (tmp_path / "whole" / "visual.safetensors").stat().st_size > 0


def test_resume_refuses_other_settings_and_a_second_start(tmp_path):
    train(config(tmp_path, "r", steps=1), progress=False)
    with pytest.raises(Exception, match="batch_size"):
        train(config(tmp_path, "r", steps=2, batch_size=3), resume=True, progress=False)
    with pytest.raises(Exception, match="already holds a checkpoint"):
        train(config(tmp_path, "r", steps=2), progress=False)


def test_train_command_trains_and_rejects_bad_input(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["train", "--out", out, "--model", "tiny", "--steps", "1", "--batch-size", "1", "--frames", "4"]) == 0
    assert "trained to step 1" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "none"), "--model", "tiny", "--resume"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--out", out, "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err


def test_training_forward_of_the_llm_equals_its_inference_prefill(tmp_path):
    llm = prepare_model(config(tmp_path, "p")).model.llm
    embeds = torch.randn(11, llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    cu_seqlens = torch.tensor([0, 4, 11], dtype=torch.int32)
    trained = llm.logits(llm.forward_packed(embeds, cu_seqlens, 7))
    served = llm.prefill(cu_seqlens, 7, inputs_embeds=embeds, all_logits=True)
    torch.testing.assert_close(trained, served, rtol=1e-5, atol=1e-5)
