"""End to end through the Python API with the tiny preset on generated videos."""
import pytest

from dynfocus_infer.engine import LLM
from dynfocus_infer.models.token_budget import count_visual_tokens
from dynfocus_infer.outputs import Request
from dynfocus_infer.sampling import SamplingParams
from dynfocus_infer.video import write_test_video
from engine_utils import nan_on_white_frames


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", num_frames=8, cluster_backend="reference")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    good = root / "good.mp4"
    write_test_video(good, num_frames=40, fps=8)
    other = root / "other.mp4"
    write_test_video(other, num_frames=24, fps=8, num_scenes=2, height=160, width=224)
    truncated = root / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    empty = root / "empty.mp4"
    empty.write_bytes(b"")
    text = root / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    return dict(good=str(good), other=str(other), truncated=str(truncated), empty=str(empty), text=str(text))


def test_video_and_text_requests_answer_with_exact_token_accounting(llm, videos):
    outputs = llm.generate([Request("What happens?", videos["good"], request_id="v"), "Say hello."],
                           SamplingParams(max_tokens=6))
    video, text = outputs
    assert video.ok and text.ok, (video.error, text.error)
    assert video.request_id == "v" and text.request_id == "1"
    assert len(video.token_ids) == 6 and video.finish_reason == "length"
    config = llm.model.config.connector
    t = video.tokens
    assert t.frames == 8 and t.visual_tokens == count_visual_tokens(8, config)
    assert 1 <= t.keyframes <= 8 and t.full_visual_tokens == 8 * config.patch_grid ** 2
    assert t.prompt_tokens > t.visual_tokens and text.tokens.visual_tokens == 0
    for stage in ("video_decode", "vit", "qformer", "connector", "prefill", "time_to_first_token", "decode_steps"):
        assert video.timings_ms[stage] >= 0, stage
    assert "random" in video.notice


def test_same_tokens_batched_or_alone_and_run_after_run(llm, videos):
    requests = [Request("What moves?", videos["good"]), Request("Colours?", videos["other"], num_frames=5),
                Request("Count to three.")]
    for params in (SamplingParams(max_tokens=9), SamplingParams(max_tokens=9, temperature=0.9, top_p=0.95, seed=11)):
        batched = [o.token_ids for o in llm.generate(requests, params)]
        alone = [llm.generate([r], params)[0].token_ids for r in requests]
        again = [o.token_ids for o in llm.generate(requests, params)]
        assert batched == alone == again
        assert all(len(ids) == 9 for ids in batched)


def test_bad_videos_fail_alone_and_the_good_one_answers(llm, videos):
    names = ["empty", "truncated", "text", "good"]
    outputs = llm.generate([Request("What is shown?", videos[n], request_id=n) for n in names],
                           SamplingParams(max_tokens=4))
    by_id = {o.request_id: o for o in outputs}
    assert by_id["good"].ok and len(by_id["good"].token_ids) == 4
    for name in names[:3]:
        out = by_id[name]
        assert not out.ok and out.finish_reason == "error"
        assert videos[name] in out.error, out.error
        assert not out.error.startswith("internal error"), out.error
    assert "empty" in by_id["empty"].error or "0 bytes" in by_id["empty"].error


def test_prompt_longer_than_the_context_is_rejected_clearly(llm, videos):
    long_question = "why " * (llm.loaded.context_length + 10)
    outputs = llm.generate([Request(long_question, videos["good"]), Request("Short?", videos["good"])],
                           SamplingParams(max_tokens=3))
    assert not outputs[0].ok and "context holds 2048" in outputs[0].error
    assert outputs[1].ok


def test_malformed_requests_fail_alone(llm):
    outputs = llm.generate(["", {"question": "ok?"}, {"video": "x.mp4"}, {"question": "q", "colour": 1}],
                           SamplingParams(max_tokens=2))
    assert [o.ok for o in outputs] == [False, True, False, False]
    assert "non-empty" in outputs[0].error and "needs a 'question'" in outputs[2].error
    assert "unknown request fields" in outputs[3].error


def test_stream_chunks_add_up_to_the_final_text(llm, videos):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=5)
    requests = [Request("Describe.", videos["good"]), Request("Tell a story.")]
    chunks = list(llm.stream(requests, params))
    finals = {c.index: c.output for c in chunks if c.finished}
    for index in (0, 1):
        streamed = "".join(c.text for c in chunks if c.index == index)
        assert streamed == finals[index].text
    assert [o.token_ids for o in llm.generate(requests, params)] == [finals[0].token_ids, finals[1].token_ids]


def test_stop_strings_cut_the_text(llm):
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=2)
    full = llm.generate(["Write something."], params)[0]
    assert len(full.text) > 6, full.text
    stop = full.text[3:6]
    cut = llm.generate(["Write something."], SamplingParams(max_tokens=24, temperature=1.0, seed=2, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)


def test_a_second_question_on_a_video_reuses_its_features(llm, videos):
    hits = llm.features.hits
    first = llm.generate([Request("First?", videos["other"])], SamplingParams(max_tokens=3))[0]
    second = llm.generate([Request("First?", videos["other"])], SamplingParams(max_tokens=3))[0]
    assert llm.features.hits >= hits + 1
    assert first.token_ids == second.token_ids
    assert "video_decode" not in second.timings_ms


@pytest.mark.parametrize("encoder,per_frame", [("full", 64), ("pool-4x4", 16), ("llama-vid", 2)])
def test_baseline_encoders_run_through_the_engine(videos, encoder, per_frame):
    llm = LLM("tiny", num_frames=6, cluster_backend="reference", visual_encoder=encoder)
    out = llm.generate([Request("What happens?", videos["good"])], SamplingParams(max_tokens=2))[0]
    assert out.ok and out.tokens.visual_tokens == 6 * per_frame


def test_unknown_visual_encoder_is_named():
    with pytest.raises(Exception, match="visual_encoder 'bogus' is unknown"):
        LLM("tiny", visual_encoder="bogus")


def test_fps_sampling_with_a_cap_and_per_request_overrides(videos):
    llm = LLM("tiny", fps=2.0, max_frames=6, cluster_backend="reference")
    capped, fixed, rate = llm.generate([Request("q?", videos["good"]), Request("q?", videos["good"], num_frames=3),
                                        Request("q?", videos["other"], fps=1.0)], SamplingParams(max_tokens=1))
    assert capped.tokens.frames == 6      # 40 frames at 8 fps, every 4th -> 10, capped to 6
    assert fixed.tokens.frames == 3
    assert rate.tokens.frames == 3        # 24 frames at 8 fps = 3 s at 1 fps


def test_requests_finishing_early_keep_their_own_tokens(videos):
    # Small sync interval and different max_tokens: after the short request finishes, the others' tokens must
    # still land on the right requests.
    llm = LLM("tiny", num_frames=4, cluster_backend="reference", sync_interval=2)
    requests = [Request("Short.", videos["good"]), Request("Longer please."), Request("Other video?", videos["other"])]
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=1), SamplingParams(max_tokens=11, temperature=1.0,
              seed=2), SamplingParams(max_tokens=7, temperature=1.0, seed=3)]
    batched = llm.generate(requests, params)
    alone = [llm.generate([r], [p])[0] for r, p in zip(requests, params)]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert [len(o.token_ids) for o in batched] == [3, 11, 7]


def test_interleaved_streams_on_one_engine_lose_nothing(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=4)
    first = llm.stream(["One?", "Two?"], params)
    next(first)
    second = list(llm.stream(["Three?"], params))
    rest = list(first)
    assert sum(c.finished for c in rest) == 2 and sum(c.finished for c in second) == 1
    expected = [o.token_ids for o in llm.generate(["One?", "Two?"], params)]
    assert [c.output.token_ids for c in sorted((c for c in rest if c.finished), key=lambda c: c.index)] == expected


def test_an_internal_failure_of_one_request_spares_the_others(llm, videos, monkeypatch):
    import dynfocus_infer.core.visual_stage as engine  # where prompts are tokenised since the v2 engine

    real = engine.tokenize_prompt

    def explode_on_boom(tokenizer, text, **kwargs):
        if "BOOM" in text:
            raise RuntimeError("simulated failure")
        return real(tokenizer, text, **kwargs)

    monkeypatch.setattr(engine, "tokenize_prompt", explode_on_boom)
    outputs = llm.generate([Request("q?", "/nonexistent.mp4"), Request("Fine?", videos["good"]), "BOOM now"],
                           SamplingParams(max_tokens=2))
    assert "no such file" in outputs[0].error
    assert outputs[1].ok and len(outputs[1].token_ids) == 2
    assert outputs[2].error.startswith("internal error (RuntimeError)")


def test_image_placeholder_in_a_question_is_a_request_error(llm):
    out = llm.generate(["What is <image> here?", "Fine."], SamplingParams(max_tokens=1))
    assert not out[0].ok and "may not contain <image>" in out[0].error and out[1].ok


def test_generate_accepts_any_iterable(llm):
    outputs = llm.generate((q for q in ["a?", "b?"]), SamplingParams(max_tokens=2))
    assert all(o is not None and o.ok for o in outputs) and len(outputs) == 2


def test_bgr_view_of_in_memory_frames_is_accepted(llm):
    import numpy as np

    frames = np.random.default_rng(0).integers(0, 255, (6, 64, 80, 3), dtype=np.uint8)
    out = llm.generate([Request("q?", frames[..., ::-1])], SamplingParams(max_tokens=1))[0]
    assert out.ok and out.tokens.frames == 6


def test_rows_that_finish_between_sync_points_stay_inside_the_kv_cache(llm):
    # The row with the largest prompt + budget decodes on until the next sync point (every 8 steps here).
    short_budget = Request("word " * 80)
    long_budget = Request("hi")
    outputs = llm.generate([short_budget, long_budget], [SamplingParams(max_tokens=2, ignore_eos=True),
                                                         SamplingParams(max_tokens=20, ignore_eos=True)])
    assert all(o.ok for o in outputs), [o.error for o in outputs]
    assert [len(o.token_ids) for o in outputs] == [2, 20]
    near_full = Request("why " * (llm.loaded.context_length - 40))
    out = llm.generate([near_full, Request("hi")], SamplingParams(max_tokens=64, ignore_eos=True))
    assert all(o.ok for o in out), [o.error for o in out]


def _scripted_tokens(monkeypatch, llm, text):
    """Every request emits the tokens of `text` (then repeats its last token): a model that says `text`."""
    import torch

    import dynfocus_infer.sampling as sampling

    script = torch.tensor(llm.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

    def scripted(self, logits, steps, rows=None):
        return script[steps.clamp(max=len(script) - 1)].to(logits.device)

    monkeypatch.setattr(sampling.BatchSampler, "__call__", scripted)


@pytest.mark.parametrize("sync_interval", [1, 2, 3])
def test_streamed_text_never_holds_what_a_stop_string_removes(monkeypatch, sync_interval):
    """A stop string completing right before an unfinished multi-byte character: the part already decoded must
    be held back too (it was streamed, then cut from the final text)."""
    engine = LLM("tiny", num_frames=4, cluster_backend="reference", sync_interval=sync_interval)
    _scripted_tokens(monkeypatch, engine, "naïve café 你好世界 ok")
    params = SamplingParams(max_tokens=30, stop=["世界"])
    final = engine.generate(["hi"], params)[0]
    assert final.text == "naïve café 你好" and final.finish_reason == "stop"
    chunks = list(engine.stream(["hi"], params))
    assert "".join(c.text for c in chunks) == final.text and chunks[-1].output.text == final.text


def test_generate_replays_every_request_a_decode_failure_interrupted(llm, monkeypatch):
    """A host-side failure (the detokeniser) mid-decode fails only its own request; the others' tokens are those
    they get without it."""
    import dynfocus_infer.core.detokenizer as detokenizer

    params = SamplingParams(max_tokens=16, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(["One?", "Two?"], params)]
    real = detokenizer.IncrementalDetokenizer._append

    def append(self, delta):
        if "BOOM" in self.stop and len(self.ids) > 1:  # after text went out
            raise RuntimeError("simulated detokeniser failure")
        return real(self, delta)

    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "_append", append)
    outputs = llm.generate(["One?", "Two?", "Bad?"], [params, params, SamplingParams(max_tokens=16, stop=["BOOM"],
                                                                                      ignore_eos=True)])
    assert [o.token_ids for o in outputs[:2]] == expected
    assert outputs[2].error.startswith("internal error (RuntimeError): simulated detokeniser failure")


def test_a_model_step_that_raises_is_pinned_on_its_request(llm, monkeypatch):
    """A step of the batched forward raises because of one request: every sequence of that step runs alone from
    then on, so only the culprit fails and the others still get the tokens they get without it."""
    from dynfocus_infer.core.model_runner import ModelRunner

    params = SamplingParams(max_tokens=10, temperature=1.0, seed=3)
    expected = [o.token_ids for o in llm.generate(["One?", "Two?"], params)]
    real = ModelRunner._embeddings

    def embeddings(self, chunks, previous=None):
        if any("BOOM" in c.seq.params.stop and len(c.seq.output_ids) >= 3 for c in chunks):
            raise RuntimeError("simulated kernel failure")
        return real(self, chunks, previous)

    monkeypatch.setattr(ModelRunner, "_embeddings", embeddings)
    bad = SamplingParams(max_tokens=10, temperature=1.0, seed=3, stop=["BOOM"])
    outputs = llm.generate(["One?", "Bad?", "Two?"], [params, bad, params])
    assert [outputs[0].token_ids, outputs[2].token_ids] == expected
    assert outputs[1].error == "internal error (RuntimeError): simulated kernel failure"
    assert llm.engine.blocks.num_used == 0 and not llm.engine.scheduler.has_work()


@pytest.mark.parametrize("encoder", ["dynfocus", "full", "uniform-8"])
def test_fps_sampling_stops_at_the_frames_the_context_holds(encoder, videos):
    from dynfocus_infer import engine as engine_module

    engine = LLM("tiny", fps=4.0, cluster_backend="reference", visual_encoder=encoder)
    cap, count = engine.fps_max_frames, engine.encoder.count_tokens
    budget = engine.loaded.context_length - engine_module.FPS_RESERVED_TOKENS
    if encoder == "uniform-8":  # its tokens stop growing at 8 frames: only the absolute cap applies
        assert cap == engine_module.MAX_FPS_FRAMES
    else:
        assert count(cap) <= budget < count(cap + 1), (cap, count(cap), count(cap + 1), budget)
    assert engine.sampling == dict(num_frames=None, fps=4.0, max_frames=cap)
    per_request = engine._sampling_of(Request("q?", videos["good"], fps=2.0))
    assert per_request == dict(num_frames=None, fps=2.0, max_frames=cap)
    assert LLM("tiny", fps=4.0, max_frames=7, cluster_backend="reference").sampling["max_frames"] == 7


def test_an_fps_request_over_the_cap_is_sampled_down_and_answers(videos):
    engine = LLM("tiny", fps=8.0, cluster_backend="reference", visual_encoder="full")  # 28 frames fit
    out = engine.generate([Request("q?", videos["good"])], SamplingParams(max_tokens=2))[0]  # 40 frames at 8 fps
    assert out.ok, out.error
    assert out.tokens.frames == engine.fps_max_frames < 40


def test_closing_a_stream_early_aborts_its_requests_and_frees_the_cache(llm):
    stream = llm.stream(["One?", "Two?"], SamplingParams(max_tokens=200, ignore_eos=True))
    first = next(stream)
    assert not first.finished
    stream.close()
    assert not llm.engine.requests and llm.engine.blocks.num_used == 0
    assert llm.generate(["One?"], SamplingParams(max_tokens=2))[0].ok


def test_generate_without_requests_is_a_request_error(llm):
    from dynfocus_infer.errors import RequestError

    for bad, name in ((None, "NoneType"), (42, "int")):
        with pytest.raises(RequestError, match=f"requests must be a question string.*got {name}"):
            llm.generate(bad)


def test_sampling_params_of_the_wrong_type_fail_the_call_by_name(llm):
    from dynfocus_infer.errors import RequestError

    with pytest.raises(RequestError, match=r"got a dict: write SamplingParams\(\*\*your_dict\)"):
        llm.generate(["a?"], {"max_tokens": 2})
    with pytest.raises(RequestError, match=r"sampling_params\[1\] must be a SamplingParams, got dict"):
        llm.generate(["a?", "b?"], [SamplingParams(max_tokens=1), {"max_tokens": 2}])


def test_malformed_requests_are_named_by_id_or_position(llm):
    outputs = llm.generate(["fine?", {"id": "mine", "question": ""}, 7],
                           SamplingParams(max_tokens=1))
    assert outputs[0].ok
    assert outputs[1].request_id == "mine" and outputs[1].error.startswith("request 'mine': the question must be")
    assert outputs[2].request_id == "2" and outputs[2].error.startswith("request 2: a request must be")
    assert "request :" not in outputs[1].error + outputs[2].error


def test_a_video_with_non_finite_features_fails_alone_with_a_clear_error(videos, monkeypatch):
    """The DPC-KNN kernels run unchecked in the engine; a NaN frame would sit at distance 0 from every frame and
    pass silently. Features of the all-white video are made NaN: that request fails, naming why; the other answers
    as it does alone."""
    import numpy as np

    from dynfocus_infer.errors import NonFiniteError

    engine = LLM("tiny", num_frames=8, cluster_backend="reference")
    alone = engine.generate([Request("What happens?", videos["good"])], SamplingParams(max_tokens=4))[0]
    monkeypatch.setattr(engine.model, "encode_frames", nan_on_white_frames(engine.model.encode_frames))
    white = np.full((8, 64, 64, 3), 255, dtype=np.uint8)
    bad, good = engine.generate([Request("What happens?", white, request_id="white"),
                                 Request("What happens?", videos["good"])], SamplingParams(max_tokens=4))
    assert not bad.ok and "NaN or inf" in bad.error and "(8, 64, 64, 3)" in bad.error, bad.error
    assert good.ok and good.token_ids == alone.token_ids
    assert issubclass(NonFiniteError, ValueError)


def _count_decodes(llm: LLM) -> list:
    """Wraps llm's loader: records, at each decode started, how many videos were already decoding or waiting for
    the ViT."""
    in_flight, submit = [], llm.loader.submit_future

    def counted(*args, **kwargs):
        in_flight.append(len(llm.visual.decoding) + len(llm.visual.encoding))
        return submit(*args, **kwargs)
    llm.loader.submit_future = counted
    return in_flight


def test_questions_on_one_video_share_its_decode_and_answer_as_if_alone(videos):
    shared = LLM("tiny", num_frames=8, cluster_backend="reference")
    alone = LLM("tiny", num_frames=8, cluster_backend="reference", feature_cache_size=0)
    decodes, alone_decodes = _count_decodes(shared), _count_decodes(alone)
    questions = ["What moves?", "How many?", "Colours?", "Where?", "Why?"]
    requests = [Request(q, videos[name], request_id=f"{name}{i}") for i, q in enumerate(questions)
                for name in ("good", "other")]
    params = SamplingParams(max_tokens=5)
    together = shared.generate(requests, params)
    separate = alone.generate(requests, params)
    assert all(o.ok for o in together), [o.error for o in together]
    assert len(decodes) == 2 and len(alone_decodes) == len(requests)
    assert shared.features.hits == len(requests) - 2 and shared.features.misses == 2
    assert [o.token_ids for o in together] == [o.token_ids for o in separate]
    assert sum("video_decode" in o.timings_ms for o in together) == 2


def test_requests_beyond_max_videos_in_flight_wait_without_frames_and_all_answer(videos):
    llm = LLM("tiny", num_frames=8, cluster_backend="reference", decode_workers=1, max_videos_in_flight=2)
    in_flight = _count_decodes(llm)
    # Seven samplings of one file are seven different videos to the engine (and to the feature cache).
    requests = [Request("What moves?", videos["good"], num_frames=n, request_id=str(n)) for n in range(2, 9)]
    requests.insert(3, Request("A bad one?", videos["truncated"], request_id="bad"))
    params = SamplingParams(max_tokens=4)
    outputs = llm.generate(requests, params)
    assert len(in_flight) == len(requests) and max(in_flight) <= 1, in_flight
    by_id = {o.request_id: o for o in outputs}
    assert not by_id["bad"].ok and videos["truncated"] in by_id["bad"].error
    unbounded = LLM("tiny", num_frames=8, cluster_backend="reference")
    expected = unbounded.generate([r for r in requests if r.request_id != "bad"], params)
    assert [by_id[o.request_id].token_ids for o in expected] == [o.token_ids for o in expected]
    assert all(by_id[o.request_id].tokens.frames == int(o.request_id) for o in expected)
    assert all(by_id[o.request_id].timings_ms["video_queue"] >= 0 for o in expected)
    assert not llm.visual.busy and llm.engine.stats()["encoding"] == 0


def test_a_queued_request_aborts_before_its_video_is_decoded(videos):
    llm = LLM("tiny", num_frames=8, cluster_backend="reference", decode_workers=1, max_videos_in_flight=1)
    in_flight = _count_decodes(llm)
    engine, params = llm.engine, SamplingParams(max_tokens=3)
    for n in (4, 5, 6):
        engine.add_request(f"r{n}", Request("What moves?", videos["good"], num_frames=n), params)
    assert engine.stats()["encoding"] == 3 and len(llm.visual.queued) == 3
    assert engine.abort("r6") and len(llm.visual.queued) == 2
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    assert len(in_flight) == 2 and finals["r6"].finish_reason == "abort" and not finals["r6"].token_ids
    assert finals["r4"].ok and finals["r5"].ok and len(finals["r5"].token_ids) == 3


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_max_videos_in_flight_is_checked(bad):
    from dynfocus_infer.errors import ConfigError

    with pytest.raises(ConfigError, match="max_videos_in_flight"):
        LLM("tiny", max_videos_in_flight=bad)
