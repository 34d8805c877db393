"""The SlowFocus family in the engine: LLM("slowfocus-tiny") (random weights) encodes a ragged batch of videos in one
pass whose visual tokens equal the model's one-video reference (`SlowFocusModel.encode_video`: CLIP, Q-Former with
the question, context token, grid pooling, temporal embedding of each frame's time, mixing with lfreq = hfreq = [0]);
focus="llm" gives pass 2 the authors' merged frames (a frame both sparse and dense twice) with their lists and
times and encodes only the new frames; batched equals alone; features from the cache keep their frame times;
what SlowFocus cannot do is refused by name; an authors'-layout directory runs as the preset does."""
import dataclasses
import json

import pytest
import torch

from dynfocus_infer.core.focus_stage import FocusStage
from dynfocus_infer.core.visual_stage import VisualStage
from dynfocus_infer.engine import LLM
from dynfocus_infer.errors import ConfigError
from dynfocus_infer.focus import dense_frame_indices, merge_frame_indices, parse_segments
from dynfocus_infer.models.slowfocus import export_slowfocus_state
from dynfocus_infer.outputs import Request
from dynfocus_infer.preprocess import preprocess_frames
from dynfocus_infer.sampling import SamplingParams
from dynfocus_infer.video import decode_video, write_test_video
from engine_utils import nan_on_white_frames

PARAMS = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def llm():
    return LLM("slowfocus-tiny", num_frames=6, focus_config={"dense_frames": 4})


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("slowfocus")
    paths = {}
    for name, frames in (("a", 48), ("b", 21), ("c", 5)):
        paths[name] = str(root / f"{name}.mp4")
        write_test_video(paths[name], num_frames=frames, fps=8, num_scenes=min(4, frames))
    return paths


@pytest.fixture
def visual_rows(monkeypatch):
    """Every prompt the engine builds: (the request's text, its visual rows) in order."""
    seen, prompt = [], VisualStage.prompt

    def recording(self, state, context):
        seen.append((state.request.text, None if state.visual is None else state.visual.clone()))
        return prompt(self, state, context)
    monkeypatch.setattr(VisualStage, "prompt", recording)
    return seen


def _reference(llm, video, question, *, num_frames=None, frame_indices=None, lfreq=(0,), hfreq=(0,),
               num_source_frames=None):
    """SlowFocusModel.encode_video on frames decoded here, the frame times from their stream indices."""
    size = llm.model.config.vit.image_size
    unique = None if frame_indices is None else sorted(set(frame_indices))   # merged frames may repeat one
    decoded = decode_video(video, num_frames=num_frames, frame_indices=unique, image_size=size)
    pixels = preprocess_frames(decoded.frames, image_size=size)
    if frame_indices is not None:
        pixels = pixels[[unique.index(i) for i in frame_indices]]
    total = num_source_frames or decoded.num_source_frames
    times = torch.tensor(frame_indices if frame_indices is not None else decoded.frame_indices.tolist(),
                         dtype=torch.float64) / total
    ids, mask = llm.loaded.question_tokenizer([question], torch.device("cpu"))
    return llm.model.encode_video(pixels, ids, times, question_mask=mask, lfreq_ids=torch.tensor(lfreq),
                                  hfreq_ids=torch.tensor(hfreq))


def test_a_ragged_batch_equals_the_one_video_reference(llm, videos, visual_rows):
    requests = [Request("What happens?", videos["a"]), Request("Which colour?", videos["b"], num_frames=9),
                "Say hello.", Request("Is it still?", videos["c"], num_frames=3),
                Request("What happens later?", videos["a"])]           # a's features again, from the cache
    outputs = llm.generate(requests, PARAMS)
    assert all(o.ok for o in outputs), [o.error for o in outputs]
    rows = dict(visual_rows)
    for request, frames in ((requests[0], 6), (requests[1], 9), (requests[3], 3), (requests[4], 6)):
        want = _reference(llm, request.video, request.question, num_frames=frames)
        assert rows[request.question].shape == (frames * 17, 64) == want.shape
        torch.testing.assert_close(rows[request.question], want, atol=2e-5, rtol=1e-4, msg=request.question)
    assert rows["Say hello."] is None
    tokens = outputs[1].tokens
    assert (tokens.frames, tokens.keyframes, tokens.visual_tokens, tokens.full_visual_tokens) == (9, 0, 153, 9 * 64)
    assert llm.features.hits >= 1, "the second question on video a did not take its features from the cache"


def test_batched_equals_alone(llm, videos, monkeypatch):
    """A focus request (its pass 1 connected with the plain videos, its pass 2 with lists of 6 sparse and 4 dense
    frames) beside plain ones: every answer's tokens and logprobs are those it has alone. (Padded lists of uneven
    lengths in one mixing call: tests/test_slowfocus_tokens.py.)"""
    monkeypatch.setattr(FocusStage, "_grounding_text", staticmethod(lambda state: "from 16 to 62"))
    requests = [Request("What happens?", videos["a"]), "Say hello.", Request("Which colour?", videos["b"]),
                Request("What moves?", videos["a"], focus="llm"), Request("Where?", videos["c"], num_frames=4)]
    together = llm.generate(requests, PARAMS)
    for request, batched in zip(requests, together):
        alone = llm.generate([request], PARAMS)[0]
        assert batched.ok and alone.ok and batched.token_ids == alone.token_ids
        for got, want in zip(batched.outputs[0].logprobs, alone.outputs[0].logprobs):
            assert got.keys() == want.keys()
            for token in got:
                assert got[token].logprob == pytest.approx(want[token].logprob, abs=1e-4)


def test_focus_llm_mixes_the_authors_merged_frames_and_encodes_only_new_ones(llm, videos, visual_rows, monkeypatch):
    monkeypatch.setattr(FocusStage, "_grounding_text", staticmethod(lambda state: "from 16 to 62"))
    calls, encode = [], llm.model.encode_frames
    monkeypatch.setattr(llm.model, "encode_frames", lambda pixels, chunk_size=None: (
        calls.append(pixels.shape[0]), encode(pixels, chunk_size=chunk_size))[1])
    out = llm.generate([Request("What moves?", videos["a"], focus="llm")], PARAMS)[0]
    assert out.ok, out.error
    sparse = [7, 15, 23, 31, 39, 47]
    dense = dense_frame_indices(parse_segments("from 16 to 62").segments[0], 48, 4)
    merged = merge_frame_indices(sparse, dense, 48)
    assert set(sparse) & set(dense), "the case must hold a frame both sparse and dense"
    assert out.focus.dense_frames == sorted(set(dense)) and out.focus.sparse_frames == sparse
    new = sorted(set(dense) - set(sparse))
    assert calls == [6, len(new)] and out.focus.frames_encoded == len(new)
    (pass1_text, pass1), (pass2_text, pass2) = visual_rows
    torch.testing.assert_close(pass1, _reference(llm, videos["a"], pass1_text, num_frames=6), atol=2e-5, rtol=1e-4)
    want = _reference(llm, videos["a"], "What moves?", frame_indices=list(merged.frame_indices),
                      lfreq=merged.lfreq_ids, hfreq=merged.hfreq_ids, num_source_frames=48)
    assert pass2_text == "What moves?" and pass2.shape == (len(merged.frame_indices) * 17, 64)
    torch.testing.assert_close(pass2, want, atol=2e-5, rtol=1e-4)
    assert out.tokens.frames == len(merged.frame_indices) and out.focus.extra_visual_tokens == len(dense) * 17


def test_what_slowfocus_cannot_do_is_refused_by_name(llm, videos):
    out = llm.generate([Request("What moves?", videos["a"], focus="dpe"), "Say hello."], PARAMS)
    assert not out[0].ok and "focus='dpe' needs a DynFocus model" in out[0].error and out[1].ok
    with pytest.raises(ConfigError, match="token-count baselines run on a DynFocus model"):
        LLM("slowfocus-tiny", visual_encoder="pool-4x4")


def test_an_authors_layout_directory_runs_like_the_preset(llm, videos, tmp_path, visual_rows):
    """The preset's weights written in the authors' layout (LLaVA shards, config.json naming mix_attn and the
    temporal embedding, a tokenizer, a Q-Former vocabulary) load back and give the same visual tokens."""
    from safetensors.torch import save_file

    config = llm.model.config
    save_file({k: v.contiguous() for k, v in export_slowfocus_state(llm.model).items()},
              str(tmp_path / "model.safetensors"))
    llm.loaded.tokenizer.save_pretrained(str(tmp_path))
    (tmp_path / "qformer_vocab.txt").write_text(llm.loaded.question_tokenizer.vocab_file.read_text())
    llm_config = config.llm
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llava", "vocab_size": llm_config.vocab_size, "hidden_size": llm_config.hidden_size,
        "intermediate_size": llm_config.intermediate_size, "num_hidden_layers": llm_config.num_layers,
        "num_attention_heads": llm_config.num_heads, "num_key_value_heads": llm_config.num_kv_heads,
        "max_position_embeddings": llm_config.max_position_embeddings, "tie_word_embeddings": True,
        "bos_token_id": llm_config.bos_token_id, "eos_token_id": llm_config.eos_token_id,
        "mm_hidden_size": config.vit.width, "mm_vision_select_layer": -2, "num_query": config.qformer.num_query_tokens,
        "compress_type": f"grid:{config.connector.pool_grid}", "temporal_embedding": "v1", "mix_attn": "bi",
        "slowfocus": {"vit": dataclasses.asdict(config.vit), "qformer": dataclasses.asdict(config.qformer),
                      "connector": {"qformer_width": config.connector.qformer_width}}}))
    loaded = LLM(str(tmp_path), num_frames=6)
    assert loaded.model.family == "slowfocus" and loaded.notice is None
    out = loaded.generate([Request("What happens?", videos["b"])], PARAMS)[0]
    assert out.ok, out.error
    want = llm.generate([Request("What happens?", videos["b"])], PARAMS)[0]
    assert out.tokens.visual_tokens == want.tokens.visual_tokens
    torch.testing.assert_close(visual_rows[0][1], visual_rows[1][1], atol=0, rtol=0)


def test_cli_answers_with_a_slowfocus_model_and_focus(videos, capsys, monkeypatch):
    from dynfocus_infer import cli

    monkeypatch.setattr(FocusStage, "_grounding_text", staticmethod(lambda state: "from 16 to 62"))
    code = cli.main(["answer", "--video", videos["a"], "--question", "What moves?", "--model", "slowfocus-tiny",
                     "--frames", "6", "--max-tokens", "3", "--focus", "llm", "--json"])
    assert code == 0, capsys.readouterr().err
    record = json.loads(capsys.readouterr().out)
    assert record["focus"]["dense_frames"] == dense_frame_indices(parse_segments("from 16 to 62").segments[0], 48, 20)
    assert "random" in record["notice"] and len(record["token_ids"]) == 3
    code = cli.main(["answer", "--video", videos["a"], "--question", "q", "--model", "slowfocus-7b"])
    assert code == 2 and "--model slowfocus-7b needs weights" in capsys.readouterr().err


def test_a_video_with_non_finite_features_fails_alone(llm, videos, monkeypatch):
    """NaN features of the all-white video: that request fails naming why; the other's tokens and logprobs are
    those it has alone (its mixing attention never reads the other video's rows)."""
    import numpy as np

    alone = llm.generate([Request("What happens?", videos["b"])], PARAMS)[0]
    monkeypatch.setattr(llm.model, "encode_frames", nan_on_white_frames(llm.model.encode_frames))
    white = np.full((6, 64, 64, 3), 255, dtype=np.uint8)
    bad, good = llm.generate([Request("What happens?", white), Request("What happens?", videos["b"])], PARAMS)
    assert not bad.ok and "NaN or inf" in bad.error and "(6, 64, 64, 3)" in bad.error, bad.error
    assert good.ok and good.token_ids == alone.token_ids
    for got, want in zip(good.outputs[0].logprobs, alone.outputs[0].logprobs):
        assert {t: lp.logprob for t, lp in got.items()} == pytest.approx({t: lp.logprob for t, lp in want.items()},
                                                                         abs=1e-4)
