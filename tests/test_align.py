"""The colour-aligned context rods (training/loss.align_loss, `train --align-weight`): which shape a question names,
which frames and tokens the loss reads, that it is low only at that shape's colour word's own embedding, where its
gradient goes, and the settings that refuse it."""
import pytest
import torch

from dynfocus_infer.errors import ConfigError
from dynfocus_infer.synthetic import sample_clip
from dynfocus_infer.training import TrainConfig, prepare_model, train
from dynfocus_infer.training.data import example, named_shape
from dynfocus_infer.training.loss import ALIGN_WORDS, align_loss, align_word_ids, batch_loss

TINY = dict(model="tiny", batch_size=2, num_frames=4, lr=1e-2, warmup_steps=0, cluster_backend="reference",
            probe_videos=1)


def test_the_named_shape_and_the_frames_that_show_it():
    seen = {"colour": 0, "shape": 0, "direction": 0, "hidden": 0}
    for index in range(60):
        clip = sample_clip(3, index, 12)
        scene = clip.scene
        for item in clip.questions:
            shape = named_shape(scene, item)
            if item["type"] not in ("colour", "shape", "direction"):
                assert shape is None
                continue
            seen[item["type"]] += 1
            named = scene.shapes[shape]
            if item["type"] == "colour":
                assert named.colour == item["answer"] and named.kind in item["question"]
            elif item["type"] == "shape":
                assert named.kind == item["answer"] and named.colour in item["question"]
            else:
                assert named.direction == item["answer"] and f"{named.colour} {named.kind}" in item["question"]
        ex = example(3, index, 12, 56)
        if ex.named_frames is None:
            assert ex.kind not in ("colour", "shape", "direction") and ex.named_colour is None
            continue
        shape = named_shape(scene, {"type": ex.kind, "question": ex.question})
        expected = [scene.visible(shape, int(f)) for f in clip.frame_indices]
        assert ex.named_frames.tolist() == expected and ex.named_colour == scene.shapes[shape].colour
        seen["hidden"] += not all(expected)
    assert all(seen.values()), seen


def test_each_answer_word_has_its_own_first_token():
    from dynfocus_infer.presets import load_model

    loaded = load_model("tiny", device=torch.device("cpu"), dtype=torch.float32)
    ids = align_word_ids(loaded)
    assert len(ids) == len(ALIGN_WORDS) == 6 and len(set(ids)) == 6
    for word, first in zip(ALIGN_WORDS, ids):  # the token the answer loss starts each answer with
        assert loaded.tokenizer(word, add_special_tokens=False)["input_ids"][0] == first


def _aligned_examples(image_size, want=4):
    """Examples whose question names a shape, at least one of them missing from some frame."""
    found, index = [], 0
    while len(found) < want or all(bool(e.named_frames.all()) for e in found):
        ex = example(5, index, 6, image_size)
        index += 1
        if ex.named_frames is not None and (len(found) < want - 1 or not bool(ex.named_frames.all())):
            found.append(ex)
    return found


def test_align_loss_reads_only_the_context_rods_of_frames_showing_the_named_shape(tmp_path):
    loaded = prepare_model(TrainConfig(out=str(tmp_path / "a"), **TINY))
    model = loaded.model
    examples = _aligned_examples(model.config.vit.image_size)
    pixels = torch.cat([e.pixels for e in examples])
    frames = [e.pixels.shape[0] for e in examples]
    with torch.no_grad():
        model.eval()
        patch = model.vit(pixels)
        ids, mask = loaded.question_tokenizer([e.question for e in examples], pixels.device)
        owner = torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(frames))
        visual = model.connector(patch[:, 1:], model.qformer(patch, ids, mask, owner), frames)
    words = model.llm.model.embed_tokens.weight.detach()[torch.tensor(align_word_ids(loaded))]

    def rods_at(word_of):
        """NaN everywhere (a read of any other token poisons the loss) but the context rods of the frames that show
        the named shape, set to word_of(its colour's index)'s embedding."""
        tokens = torch.full_like(visual.tokens, float("nan"))
        for b, ex in enumerate(examples):
            for t in torch.nonzero(ex.named_frames).flatten().tolist():
                row = visual.token_offsets[b] + visual.frame_token_offsets[b, t + 1] - 1
                tokens[row] = words[word_of(ALIGN_WORDS.index(ex.named_colour))]
        return visual._replace(tokens=tokens)

    right = align_loss(loaded, rods_at(lambda w: w), examples).item()
    wrong = align_loss(loaded, rods_at(lambda w: (w + 1) % len(ALIGN_WORDS)), examples).item()
    scaled = rods_at(lambda w: w)
    scaled = scaled._replace(tokens=scaled.tokens * 3)
    assert 0 <= right < 0.1 and wrong > 2.0 and align_loss(loaded, scaled, examples).item() > right + 0.5
    # Only other question types: nothing to align.
    other = [e for e in (example(5, i, 6, model.config.vit.image_size) for i in range(30))
             if e.named_frames is None][:2]
    assert align_loss(loaded, visual, other).item() == 0


def test_align_loss_trains_the_context_path_through_the_qformer_not_the_projector(tmp_path):
    loaded = prepare_model(TrainConfig(out=str(tmp_path / "g"), **TINY))
    model = loaded.model
    examples = _aligned_examples(model.config.vit.image_size, want=2)
    result = batch_loss(loaded, examples, answered=1, align_weight=1.0, patch_probe=None)
    assert result.align > 0 and abs(result.loss.item() - result.answer - result.align) < 1e-4
    pixels = torch.cat([e.pixels for e in examples])
    frames = [e.pixels.shape[0] for e in examples]
    patch = model.vit(pixels)
    ids, mask = loaded.question_tokenizer([e.question for e in examples], pixels.device)
    owner = torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(frames))
    visual = model.connector(patch[:, 1:], model.qformer(patch, ids, mask, owner), frames, check=False)
    align_loss(loaded, visual, examples).backward()
    for name, parameter in [("vit", model.vit.patch_embed.proj.weight), ("qformer", model.qformer.vlm_att_query),
                            ("val_projector", model.connector.vlm_att_val_projector.weight),
                            ("key_projector", model.connector.vlm_att_key_projector.weight)]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    unread = model.connector.mm_projector[0].weight.grad  # the first rods and the cones are not read
    assert unread is None or not unread.any()


def test_align_weight_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="--align-weight"):
        TrainConfig(out=str(tmp_path / "x"), align_weight=-1.0)
    with pytest.raises(ConfigError, match="context rod"):
        TrainConfig(out=str(tmp_path / "x"), align_weight=1.0, visual_encoder="pool-2x2")
    TrainConfig(out=str(tmp_path / "x"), align_weight=1.0, visual_encoder="llama-vid")
    train(TrainConfig(out=str(tmp_path / "r"), steps=1, **TINY), progress=False)
    with pytest.raises(ConfigError, match="align_weight"):
        train(TrainConfig(out=str(tmp_path / "r"), steps=2, align_weight=1.0, **TINY), resume=True, progress=False)
    result = train(TrainConfig(out=str(tmp_path / "w"), steps=2, align_weight=1.0, checkpoint_every=1, **TINY),
                   progress=False)
    assert all(row["align"] >= 0 for row in result["losses"])
    assert any(row["align"] > 0 for row in result["losses"])
