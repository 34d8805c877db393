"""Q-Former at tiny sizes against transformers' InstructBlipQFormerModel; official-layout round trip; tokenizer."""
import pytest
import torch
import torch.nn.functional as F

from dynfocus_infer.config import QFormerConfig
from dynfocus_infer.errors import CheckpointError
from dynfocus_infer.models.bert_tokenizer import QuestionTokenizer, write_vocab
from dynfocus_infer.models.qformer import (QFormerEncoder, convert_hf_qformer, convert_official_qformer,
                                           export_official_qformer)

transformers = pytest.importorskip("transformers")

# Three layers with cross-attention on layers 0 and 2, as every second layer of the real twelve.
TINY = QFormerConfig(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48, cross_attention_freq=2,
                     encoder_width=40, num_query_tokens=4, vocab_size=30, max_position_embeddings=16,
                     output_width=24)
NUM_TOKENS = 7  # frame tokens per frame (CLS + 6)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm_weight = ("LayerNorm" in name or "layernorm" in name or "_ln" in name) and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.2 * noise)


def _hf_qformer(config: QFormerConfig, seed: int = 0):
    hf_config = transformers.InstructBlipQFormerConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings, cross_attention_frequency=config.cross_attention_freq,
        encoder_hidden_size=config.encoder_width, layer_norm_eps=config.layer_norm_eps, pad_token_id=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf_config._attn_implementation = "eager"
    model = transformers.InstructBlipQFormerModel(hf_config).eval()
    _randomise(model, seed)
    return model


def _ours_from_hf(hf, seed: int = 1) -> QFormerEncoder:
    """Our module with HF's BERT; vlm_att_query / vlm_att_ln / vlm_att_projector (not in HF) random."""
    ours = QFormerEncoder(TINY).eval()
    _randomise(ours, seed)
    converted = convert_hf_qformer(hf.state_dict(), TINY)
    assert not any(name.startswith(("vlm_att_query", "vlm_att_ln", "vlm_att_projector")) for name in converted)
    result = ours.load_state_dict(converted, strict=False)
    assert sorted(result.missing_keys) == ["vlm_att_ln.bias", "vlm_att_ln.weight", "vlm_att_projector.bias",
                                           "vlm_att_projector.weight", "vlm_att_query"]
    return ours


def _hf_reference(hf, ours, frames, question_ids, question_mask, frame_question):
    """The official per-frame flow: LN(frames) -> BERT(queries; question of the frame) -> 32 query rows -> Linear."""
    ln = ours.vlm_att_ln
    encoder_states = F.layer_norm(frames, (frames.shape[-1],), ln.weight, ln.bias, ln.eps)
    with torch.no_grad():
        out = hf(input_ids=None if question_ids is None else question_ids[frame_question],
                 attention_mask=None if question_ids is None else torch.cat(
                     (torch.ones(len(frame_question), TINY.num_query_tokens, dtype=torch.long),
                      question_mask[frame_question]), dim=1),
                 query_embeds=ours.vlm_att_query.expand(len(frame_question), -1, -1),
                 encoder_hidden_states=encoder_states,
                 encoder_attention_mask=torch.ones(frames.shape[:2], dtype=torch.long))
        return ours.vlm_att_projector(out.last_hidden_state[:, :TINY.num_query_tokens])


def _padded_questions(generator):
    """Two videos' questions of 6 and 3 tokens, right-padded with 0 to 6."""
    ids = torch.randint(1, TINY.vocab_size, (2, 6), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    return ids * mask, mask


def test_qformer_matches_hf_with_padded_questions_of_two_videos():
    generator = torch.Generator().manual_seed(2)
    hf = _hf_qformer(TINY)
    ours = _ours_from_hf(hf)
    frames = 3.0 * torch.randn(5, NUM_TOKENS, TINY.encoder_width, generator=generator)
    ids, mask = _padded_questions(generator)
    frame_question = torch.tensor([0, 0, 0, 1, 1])
    with torch.no_grad():
        out = ours(frames, ids, mask, frame_question)
    expected = _hf_reference(hf, ours, frames, ids, mask, frame_question)
    assert out.shape == (5, TINY.num_query_tokens, TINY.output_width)
    assert (out - expected).abs().max().item() < 1e-4


def test_padding_does_not_change_query_states():
    generator = torch.Generator().manual_seed(3)
    ours = QFormerEncoder(TINY).eval()
    _randomise(ours, 4)
    frames = torch.randn(5, NUM_TOKENS, TINY.encoder_width, generator=generator)
    ids, mask = _padded_questions(generator)
    with torch.no_grad():
        batched = ours(frames, ids, mask, torch.tensor([0, 0, 0, 1, 1]))
        first_alone = ours(frames[:3], ids[:1])
        second_alone = ours(frames[3:], ids[1:, :3])
    torch.testing.assert_close(batched[:3], first_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[3:], second_alone, atol=1e-5, rtol=0)


def test_shared_question_equals_one_copy_per_frame():
    generator = torch.Generator().manual_seed(5)
    ours = QFormerEncoder(TINY).eval()
    _randomise(ours, 6)
    frames = torch.randn(4, NUM_TOKENS, TINY.encoder_width, generator=generator)
    ids = torch.randint(1, TINY.vocab_size, (1, 5), generator=generator)
    with torch.no_grad():
        shared = ours(frames, ids)
        copied = ours(frames, ids.expand(4, -1).clone())
    torch.testing.assert_close(shared, copied, atol=1e-5, rtol=0)
    assert (shared[0] - shared[1]).abs().max() > 1e-3, "different frames must give different query states"


def test_queries_only_matches_hf_without_text():
    generator = torch.Generator().manual_seed(7)
    hf = _hf_qformer(TINY, seed=8)
    ours = _ours_from_hf(hf, seed=9)
    frames = torch.randn(3, NUM_TOKENS, TINY.encoder_width, generator=generator)
    with torch.no_grad():
        out = ours(frames)
    expected = _hf_reference(hf, ours, frames, None, None, torch.arange(3))
    assert (out - expected).abs().max().item() < 1e-4


def test_whole_instructblip_state_dict_supplies_query_tokens_and_ln():
    hf = _hf_qformer(TINY, seed=10)
    whole = {f"qformer.{k}": v for k, v in hf.state_dict().items()}
    whole["query_tokens"] = torch.randn(1, TINY.num_query_tokens, TINY.hidden_size)
    whole["vision_model.post_layernorm.weight"] = torch.randn(TINY.encoder_width)
    whole["vision_model.post_layernorm.bias"] = torch.randn(TINY.encoder_width)
    whole["vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.randn(3, 3)  # another part: ignored
    whole["language_projection.weight"] = torch.randn(3, 3)
    converted = convert_hf_qformer(whole, TINY)
    assert torch.equal(converted["vlm_att_query"], whole["query_tokens"])
    assert torch.equal(converted["vlm_att_ln.bias"], whole["vision_model.post_layernorm.bias"])
    assert "bert.encoder.layer.2.crossattention.self.key.weight" in converted
    assert "bert.encoder.layer.1.crossattention.self.key.weight" not in converted


def test_official_layout_round_trip_gives_identical_outputs():
    generator = torch.Generator().manual_seed(11)
    source = QFormerEncoder(TINY).eval()
    _randomise(source, 12)
    official = export_official_qformer(source.state_dict())
    assert "model.vlm_att_encoder.bert.encoder.layer.0.crossattention.self.key.weight" in official
    assert "model.vlm_att_encoder.bert.embeddings.LayerNorm.weight" in official
    assert "model.vlm_att_query" in official and "model.vlm_att_projector.weight" in official
    # A whole-model checkpoint also holds the connector, the LLM and BERT's position_ids buffer.
    official["model.vlm_att_encoder.bert.embeddings.position_ids"] = torch.arange(TINY.max_position_embeddings)[None]
    official["model.vlm_att_key_projector.weight"] = torch.randn(4, 4)
    official["model.layers.0.mlp.up_proj.weight"] = torch.randn(4, 4)
    target = QFormerEncoder(TINY).eval()
    target.load_state_dict(convert_official_qformer(official, TINY), strict=True)
    frames = torch.randn(3, NUM_TOKENS, TINY.encoder_width, generator=generator)
    ids, mask = _padded_questions(generator)
    with torch.no_grad():
        assert torch.equal(target(frames, ids, mask, torch.tensor([1, 0, 1])),
                           source(frames, ids, mask, torch.tensor([1, 0, 1])))


def test_converters_name_missing_and_unexpected_keys():
    official = export_official_qformer(QFormerEncoder(TINY).state_dict())
    del official["model.vlm_att_encoder.bert.encoder.layer.2.crossattention.output.dense.bias"]
    official["model.vlm_att_encoder.cls.predictions.bias"] = torch.zeros(TINY.vocab_size)
    with pytest.raises(CheckpointError) as error:
        convert_official_qformer(official, TINY)
    assert "missing (1): bert.encoder.layer.2.crossattention.output.dense.bias" in str(error.value)
    assert "unexpected (1): cls.predictions.bias" in str(error.value)
    hf_state = dict(_hf_qformer(TINY).state_dict())
    del hf_state["encoder.layer.1.output_query.LayerNorm.weight"]
    with pytest.raises(CheckpointError, match=r"missing \(1\): bert\.encoder\.layer\.1\.output_query\.LayerNorm"):
        convert_hf_qformer(hf_state, TINY)
    hf_state = dict(_hf_qformer(TINY).state_dict())
    hf_state["embeddings.word_embeddings.weight"] = torch.zeros(TINY.vocab_size + 1, TINY.hidden_size)
    with pytest.raises(CheckpointError, match=r"wrong shape \(1\): bert\.embeddings\.word_embeddings\.weight"):
        convert_hf_qformer(hf_state, TINY)


def test_qformer_rejects_mismatched_inputs():
    ours = QFormerEncoder(TINY)
    frames = torch.randn(3, NUM_TOKENS, TINY.encoder_width)
    with pytest.raises(ValueError, match="frame_question"):
        ours(frames, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(frames, torch.ones(1, TINY.max_position_embeddings + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[T, S, 40\]"):
        ours(torch.randn(3, NUM_TOKENS, 41))


def test_full_size_qformer_has_the_official_shapes():
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in QFormerEncoder(QFormerConfig()).state_dict().items()}
    assert shapes["vlm_att_query"] == (1, 32, 768)
    assert shapes["vlm_att_ln.weight"] == (1408,)
    assert shapes["vlm_att_projector.weight"] == (1408, 768)
    assert shapes["bert.embeddings.word_embeddings.weight"] == (30523, 768)
    assert shapes["bert.encoder.layer.10.crossattention.self.key.weight"] == (768, 1408)
    assert "bert.encoder.layer.11.crossattention.self.key.weight" not in shapes
    assert shapes["bert.encoder.layer.11.intermediate_query.dense.weight"] == (3072, 768)


WORDS = ["what", "is", "the", "cat", "doing", "?", "on", "mat", "##s", "sat"]


def test_tokenizer_adds_dec_pads_right_and_truncates_left(tmp_path):
    tokenizer = QuestionTokenizer(write_vocab(tmp_path, WORDS), max_length=6)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    assert tokenizer.vocab_size == len(vocab) + 1 and tokenizer.dec_token_id == len(vocab)
    ids, mask = tokenizer(["What is the CAT doing?", "cats sat", "Dog?"])
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    # Left truncation drops the start of a long question and keeps its end.
    assert ids[0].tolist() == [cls, vocab["the"], vocab["cat"], vocab["doing"], vocab["?"], sep]
    assert ids[1].tolist() == [cls, vocab["cat"], vocab["##s"], vocab["sat"], sep, 0]
    assert ids[2].tolist() == [cls, vocab["[UNK]"], vocab["?"], sep, 0, 0]
    assert mask.tolist() == [[1] * 6, [1] * 5 + [0], [1] * 4 + [0, 0]]


def test_tokenizer_output_drives_the_qformer(tmp_path):
    tokenizer = QuestionTokenizer(tmp_path / write_vocab(tmp_path, WORDS).name)
    config = QFormerConfig(**{**TINY.__dict__, "vocab_size": tokenizer.vocab_size})
    ours = QFormerEncoder(config).eval()
    ids, mask = tokenizer(["what is the cat doing?", "the mat"])
    with torch.no_grad():
        out = ours(torch.randn(4, NUM_TOKENS, TINY.encoder_width), ids, mask, torch.tensor([0, 1, 1, 0]))
    assert out.shape == (4, TINY.num_query_tokens, TINY.output_width) and torch.isfinite(out).all()


def test_tokenizer_reports_a_missing_vocabulary(tmp_path):
    with pytest.raises(CheckpointError, match="vocab.txt"):
        QuestionTokenizer(tmp_path)


def test_load_checkpoint_official_into_meta_and_hf_keeps_the_projector():
    generator = torch.Generator().manual_seed(13)
    source = QFormerEncoder(TINY).eval()
    _randomise(source, 14)
    with torch.device("meta"):
        target = QFormerEncoder(TINY)
    target.load_checkpoint(export_official_qformer(source.state_dict()), layout="official")
    frames = torch.randn(2, NUM_TOKENS, TINY.encoder_width, generator=generator)
    ids = torch.randint(1, TINY.vocab_size, (1, 4), generator=generator)
    with torch.no_grad():
        assert torch.equal(target.eval()(frames, ids), source(frames, ids))
    hf = _hf_qformer(TINY, seed=15)
    projector_before = target.vlm_att_projector.weight.clone()
    target.load_checkpoint(hf.state_dict(), layout="hf")
    assert torch.equal(target.vlm_att_projector.weight, projector_before)
    assert torch.equal(target.bert.embeddings.LayerNorm.weight, hf.embeddings.layernorm.weight)


@pytest.mark.gpu
def test_full_size_qformer_in_bfloat16_on_cuda_tracks_float32():
    torch.manual_seed(16)
    with torch.device("cuda"):
        ours = QFormerEncoder(QFormerConfig()).eval()
    frames = torch.randn(6, 257, 1408, device="cuda")
    ids = torch.randint(1000, 30000, (2, 20), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    frame_question = torch.tensor([0, 0, 0, 1, 1, 1], device="cuda")
    with torch.no_grad():
        reference = ours(frames, ids, mask, frame_question)
        low = ours.to(torch.bfloat16)(frames.bfloat16(), ids, mask, frame_question)
    assert low.shape == (6, 32, 1408) and low.dtype == torch.bfloat16
    relative_rms = ((low.float() - reference).pow(2).mean() / reference.pow(2).mean()).sqrt().item()
    assert relative_rms < 5e-2
