"""Focus inference in the engine (DESIGN.md section 13): focus="llm" runs its grounding pass and its answer as one
request, encodes only the frames pass 1 did not have, accounts for every token the LLM reads, batches like any
request, and falls back on bad grounding answers; focus="dpe" turns its dense frames into keyframes. The tiny
model's grounding answer is meaningless, so the tests stand in for it (FocusStage._grounding_text)."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from dynfocus_infer import cli
from dynfocus_infer.core.focus_stage import FocusConfig, FocusStage
from dynfocus_infer.engine import LLM
from dynfocus_infer.errors import ConfigError, RequestError
from dynfocus_infer.focus.event_grounding import add_keyframes, best_segments
from dynfocus_infer.models.token_budget import num_keyframes
from dynfocus_infer.outputs import Request
from dynfocus_infer.sampling import SamplingParams
from dynfocus_infer.video import available_backends, decode_video, render_test_frames, write_test_video

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)
SPARSE = [7, 15, 23, 31, 39, 47]          # 6 uniform frames of a 48-frame video


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", num_frames=6, cluster_backend="reference", focus_config={"dense_frames": 4})


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("focus") / "v.mp4"
    write_test_video(path, num_frames=48, fps=8)
    return str(path)


@pytest.fixture
def grounding(monkeypatch):
    """answer(text): pass 1 of every llm request answers `text`."""
    def answer(text):
        monkeypatch.setattr(FocusStage, "_grounding_text", staticmethod(lambda state: text))
    return answer


@pytest.fixture
def vit_calls(llm, monkeypatch):
    """Frames of every ViT call, in order."""
    calls, encode = [], llm.model.encode_frames

    def counting(pixels, chunk_size=None):
        calls.append(pixels.shape[0])
        return encode(pixels, chunk_size=chunk_size)
    monkeypatch.setattr(llm.model, "encode_frames", counting)
    return calls


def test_pass_two_encodes_only_the_frames_pass_one_did_not_have(llm, video, grounding, vit_calls):
    grounding("The event happens from 30 to 50.")     # frames 14..24; 15 and 23 are sparse frames already
    llm.visual.focus.config = FocusConfig(dense_frames=11)
    try:
        output = llm.generate([Request("What happens?", video, focus="llm")], PARAMS)[0]
    finally:
        llm.visual.focus.config = FocusConfig(dense_frames=4)
    assert output.ok, output.error
    focus = output.focus
    assert focus.status == "parsed" and focus.segments == [(0.3, 0.5)]
    assert focus.sparse_frames == SPARSE and focus.dense_frames == list(range(14, 25))
    assert vit_calls == [6, 9]
    assert focus.frames_decoded == 9 and focus.frames_encoded == 9
    assert output.tokens.frames == 15


def test_token_accounting_equals_what_the_llm_receives(llm, video, grounding, monkeypatch):
    grounding("from 20 to 50")
    rows, prompt = [], llm.visual.prompt

    def recording(state, context):
        embeds, ids = prompt(state, context)
        rows.append((embeds.shape[0], len(ids)))
        return embeds, ids
    monkeypatch.setattr(llm.visual, "prompt", recording)
    output = llm.generate([Request("What happens?", video, focus="llm")], PARAMS)[0]
    assert output.ok, output.error
    (pass1_rows, pass1_ids), (pass2_rows, pass2_ids) = rows
    focus, tokens = output.focus, output.tokens
    assert focus.dense_frames == [10, 14, 19, 24] and tokens.frames == 10
    assert (focus.pass1_prompt_tokens, tokens.prompt_tokens) == (pass1_rows, pass2_rows) == (pass1_ids, pass2_ids)
    assert focus.pass1_generated_tokens == 24        # the tiny model never stops early: the grounding limit
    assert tokens.visual_tokens == llm.encoder.count_tokens(10)
    assert focus.extra_visual_tokens == tokens.visual_tokens - llm.encoder.count_tokens(6)
    assert focus.extra_tokens == pass1_rows + 24 + focus.extra_visual_tokens
    assert len(output.token_ids) == PARAMS.max_tokens and tokens.generated_tokens == PARAMS.max_tokens


def test_focus_requests_batched_with_plain_ones_equal_running_alone(llm, video, grounding):
    grounding("from 20 to 50")
    requests = [Request("What happens?", video, focus="llm"), Request("Say hello."),
                Request("Which colours?", video, focus="dpe"), Request("What moves?", video)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (6, 9, 5, 7)]
    together = llm.generate(requests, params)
    for request, param, batched in zip(requests, params, together):
        alone = llm.generate([request], param)[0]
        assert batched.ok and alone.ok, (batched.error, alone.error)
        assert batched.token_ids == alone.token_ids and len(alone.token_ids) == param.max_tokens
        assert (batched.focus is None) == (request.focus is None)
        if batched.focus is not None:
            assert batched.focus.to_dict() == alone.focus.to_dict()
    assert together[2].focus.status == "events" and together[2].focus.dense_frames


def test_focus_requests_under_the_output_lag_equal_resolving_every_step(llm, video, grounding):
    """With async_output (CUDA's default) pass 1 ends one step later on the host; outputs must not change."""
    grounding("from 20 to 50")
    lagged = LLM("tiny", num_frames=6, cluster_backend="reference", focus_config={"dense_frames": 4},
                 async_output=True)
    requests = [Request("What happens?", video, focus="llm"), Request("Say hello."),
                Request("Which colours?", video, focus="dpe")]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (6, 9, 5)]
    for got, want in zip(lagged.generate(requests, params), llm.generate(requests, params)):
        assert got.ok and want.ok, (got.error, want.error)
        assert got.token_ids == want.token_ids and got.text == want.text
        assert (got.focus and got.focus.to_dict()) == (want.focus and want.focus.to_dict())


def test_a_video_shorter_than_the_dense_count(llm, tmp_path, grounding, vit_calls):
    path = str(tmp_path / "short.mp4")
    write_test_video(path, num_frames=5, fps=8)
    grounding("from 00 to 99")
    output = llm.generate([Request("What happens?", path, num_frames=4, focus="llm")], PARAMS)[0]
    assert output.ok, output.error
    assert output.focus.sparse_frames == [0, 2, 3, 4] and output.focus.dense_frames == [0, 1, 2, 3, 4]
    assert vit_calls == [4, 1] and output.tokens.frames == 5


def test_a_segment_of_one_frame(llm, video, grounding, vit_calls):
    grounding("from 400 to 401")
    output = llm.generate([Request("What happens?", video, focus="llm")], PARAMS)[0]
    assert output.ok, output.error
    assert output.focus.dense_frames == [19] and output.focus.frames_encoded == 1 and vit_calls == [6, 1]
    assert output.tokens.frames == 7


@pytest.mark.parametrize("answer,reason", [("It happens at 5 to 9.", "malformed"), ("No idea.", "missing"),
                                           ("from 040 to 040", "malformed")])
def test_unusable_grounding_answers_fall_back_to_the_plain_answer(llm, video, grounding, vit_calls, answer, reason):
    grounding(answer)
    plain = llm.generate([Request("What happens?", video)], PARAMS)[0]
    vit_calls.clear()
    output = llm.generate([Request("What happens?", video, focus="llm")], PARAMS)[0]
    assert output.ok, output.error
    focus = output.focus
    assert (focus.status, focus.reason, focus.segments, focus.dense_frames) == ("fallback", reason, [], [])
    assert (focus.frames_decoded, focus.frames_encoded, vit_calls) == (0, 0, [6])
    assert output.token_ids == plain.token_ids and output.tokens.prompt_tokens == plain.tokens.prompt_tokens
    assert focus.extra_tokens == focus.pass1_prompt_tokens + focus.pass1_generated_tokens > 0


def test_a_reversed_grounding_answer_is_swapped_and_says_so(llm, video, grounding):
    grounding("from 50 to 20")
    output = llm.generate([Request("What happens?", video, focus="llm")], PARAMS)[0]
    assert output.ok, output.error
    assert (output.focus.status, output.focus.fixes, output.focus.segments) == ("repaired", ["swapped"], [(0.2, 0.5)])
    assert output.focus.dense_frames == [10, 14, 19, 24]


def test_an_aborted_focus_request_fails_alone(llm, video, grounding):
    grounding("from 20 to 50")
    engine = llm.engine
    plain = llm.generate([Request("Say hello.")], PARAMS)[0]
    engine.add_request("f", Request("What happens?", video, focus="llm"), PARAMS)
    engine.add_request("p", Request("Say hello."), PARAMS)
    finals, aborted = {}, False
    for _ in range(500):
        for output in engine.step():
            assert output.request_id != "f" or output.finished, "pass 1's tokens must not be streamed"
            if output.finished:
                finals[output.request_id] = output
        state = engine.requests.get("f")
        if not aborted and state is not None and state.focus.phase == "grounding" and state.seqs:
            aborted = engine.abort("f")
        if len(finals) == 2:
            break
    assert finals["f"].finish_reason == "abort" and finals["p"].ok and finals["p"].token_ids == plain.token_ids
    assert engine.blocks.num_used == 0


def test_a_dense_decode_failure_fails_that_request_alone(llm, video, grounding, monkeypatch):
    grounding("from 20 to 50")
    submit = llm.loader.submit_future

    def failing(source, **kwargs):
        if kwargs.get("frame_indices") is not None:
            kwargs["frame_indices"] = (10_000,)           # past the end: a VideoDecodeError on the thread pool
        return submit(source, **kwargs)
    monkeypatch.setattr(llm.loader, "submit_future", failing)
    focused, plain = llm.generate([Request("What happens?", video, focus="llm"), Request("What moves?", video)],
                                  PARAMS)
    assert not focused.ok and "frame 10000" in focused.error and focused.focus.status == "parsed"
    assert plain.ok and len(plain.token_ids) == PARAMS.max_tokens


def test_dpe_makes_every_dense_frame_a_keyframe(llm, video, vit_calls):
    llm.visual.focus.config = FocusConfig(dense_frames=8, padding=0.1)
    try:
        output = llm.generate([Request("What happens?", video, focus="dpe")], PARAMS)[0]
    finally:
        llm.visual.focus.config = FocusConfig(dense_frames=4)
    assert output.ok, output.error
    focus, tokens = output.focus, output.tokens
    assert focus.status == "events" and len(focus.segments) == 1 and focus.pass1_prompt_tokens == 0
    new = sorted(set(focus.dense_frames) - set(SPARSE))
    assert vit_calls == [6, len(new)] and focus.frames_encoded == len(new) > 0
    assert tokens.frames == 6 + len(new)
    budget = llm.model.connector.budget
    # every dense frame a keyframe on top of the top-K: tokens say how many keyframes were added
    plain_tokens = llm.encoder.count_tokens(tokens.frames)
    added = (tokens.visual_tokens - plain_tokens) // budget.cone_tokens
    assert tokens.visual_tokens == plain_tokens + added * budget.cone_tokens
    assert tokens.keyframes == num_keyframes(tokens.frames, llm.model.connector.config) + added
    assert tokens.keyframes >= len(focus.dense_frames)


def test_best_segments_picks_the_best_run_and_pads_it():
    events = torch.tensor([0, 0, 1, 1, 1, 0, 2, 2])
    scores = torch.tensor([0.1, 0.1, 0.9, 0.8, 0.7, 0.2, 0.5, 0.6])
    sparse = [0, 10, 20, 30, 40, 50, 60, 70]
    def segments(**knobs):
        return np.round(best_segments(events, scores, sparse, 80, **knobs), 9).tolist()
    assert segments(num_runs=1, padding=0.05) == [[0.2, 0.55]]
    assert segments(num_runs=2, padding=0.0) == [[0.25, 0.5], [0.75, 0.875]]
    # padded until they overlap, the two best runs (frames 2-4 and 6-7) merge into one segment, clipped at the end
    assert segments(num_runs=2, padding=0.15) == [[0.1, 1.0]]


def test_add_keyframes_puts_cones_before_the_rods_of_dense_frames_only(llm):
    connector = llm.model.connector
    cones = connector.budget.cone_tokens
    torch.manual_seed(0)
    patch_tokens = torch.randn(4, connector.config.patch_grid ** 2, connector.config.vision_width)
    frame_mask = torch.tensor([True, False, False, True])
    counts = torch.tensor([cones + 2, 2, 2, cones + 2])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    tokens = torch.arange(int(offsets[-1]), dtype=torch.float32)[:, None].expand(-1, connector.config.llm_width)
    with torch.inference_mode():
        out, added = add_keyframes(connector, tokens.clone(), offsets, frame_mask, patch_tokens, torch.tensor([2, 3]))
    assert added == 1 and out.shape[0] == tokens.shape[0] + cones
    before = int(offsets[2])
    assert torch.equal(out[:before], tokens[:before])                    # frames 0 and 1 unchanged
    assert not torch.equal(out[before:before + cones], tokens[before:before + cones])
    assert torch.equal(out[before + cones:], tokens[before:])            # frame 2's rods, then frame 3 as it was


@pytest.mark.parametrize("backend", available_backends())
def test_frames_read_by_index_equal_the_same_frames_of_a_full_decode(video, backend):
    wanted = (3, 10, 14, 19, 24, 47)
    by_index = decode_video(video, frame_indices=wanted, backend=backend)
    full = decode_video(video, num_frames=48, backend=backend)
    assert by_index.frame_indices.tolist() == list(wanted)
    assert torch.equal(by_index.frames, full.frames[list(wanted)])
    if backend == "pyav" and "decord" in available_backends():
        other = decode_video(video, frame_indices=wanted, backend="decord")
        assert np.abs(other.frames.numpy().astype(int) - by_index.frames.numpy().astype(int)).max() <= 2


@pytest.mark.parametrize("value", ["fast", "LLM", 1])
def test_a_bad_focus_value_is_a_request_error_naming_it(value, video):
    with pytest.raises(RequestError, match=f"focus = {value!r} is invalid"):
        Request("What happens?", video, focus=value)
    with pytest.raises(RequestError, match=f"focus = {value!r} is invalid"):
        Request.coerce({"question": "What happens?", "video": video, "focus": value})
    with pytest.raises(RequestError, match="needs a question and a video"):
        Request("What happens?", focus="llm")
    with pytest.raises(ConfigError, match="dense_frames"):
        FocusConfig(dense_frames=0)


def test_a_bad_focus_value_in_generate_fails_that_request_alone(llm, video):
    bad, good = llm.generate([{"question": "q?", "video": video, "focus": "fast"}, "Say hello."], PARAMS)
    assert not bad.ok and "focus = 'fast' is invalid" in bad.error and good.ok


def test_cli_answer_with_focus_prints_the_focus_in_json(video, capsys, grounding):
    grounding("from 20 to 50")
    code = cli.main(["answer", "--video", video, "--question", "What happens?", "--model", "tiny", "--frames", "6",
                     "--max-tokens", "3", "--focus", "llm", "--json"])
    assert code == 0, capsys.readouterr().err
    record = json.loads(capsys.readouterr().out)
    assert record["focus"]["mode"] == "llm" and record["focus"]["segments"] == [[0.2, 0.5]]
    assert record["focus"]["dense_frames"] == list(range(10, 25)) and len(record["token_ids"]) == 3


def test_cli_batch_with_focus_and_per_line_focus(video, tmp_path, capsys):
    requests = tmp_path / "in.jsonl"
    lines = [{"id": "a", "question": "What happens?", "video": video},
             {"id": "b", "question": "What happens?", "video": video, "focus": None},
             {"id": "c", "question": "Say hello."},
             {"id": "d", "question": "What happens?", "video": video, "focus": "sideways"}]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out.jsonl"
    code = cli.main(["batch", "--input", str(requests), "--output", str(output), "--model", "tiny", "--frames", "6",
                     "--max-tokens", "2", "--focus", "dpe"])
    assert code == 0, capsys.readouterr().err
    records = {r["request_id"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert records["a"]["focus"]["mode"] == "dpe" and records["a"]["error"] is None
    assert "focus" not in records["b"] and "focus" not in records["c"] and records["c"]["error"] is None
    assert "focus = 'sideways' is invalid" in records["d"]["error"]
    with pytest.raises(SystemExit) as stop:
        cli.main(["answer", "--question", "q", "--focus", "fast"])
    assert stop.value.code == 2


def test_in_memory_frames_are_read_by_index_too(llm, grounding):
    frames = render_test_frames(num_frames=30, height=64, width=80)
    grounding("from 20 to 50")
    output = llm.generate([Request("What happens?", frames, focus="llm")], PARAMS)[0]
    assert output.ok, output.error
    focus = output.focus
    assert focus.sparse_frames == [4, 9, 14, 19, 24, 29] and focus.dense_frames == [6, 9, 12, 15]
    assert focus.frames_decoded == focus.frames_encoded == 3 and output.tokens.frames == 9   # frame 9 was sparse


# -- focus on conversations (LLM.chat, the server): the question is the last user message's text ----------------

def _user(video, text):
    return {"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": text}]}


@pytest.mark.parametrize("mode", ["llm", "dpe"])
def test_a_chat_with_focus_equals_the_same_question_with_focus(llm, video, grounding, mode):
    grounding("from 20 to 50")
    chat = llm.chat([_user(video, "What happens?")], PARAMS, focus=mode)[0]
    asked = llm.generate([Request("What happens?", video, focus=mode)], PARAMS)[0]
    assert chat.ok and asked.ok, (chat.error, asked.error)
    assert chat.token_ids == asked.token_ids
    uncached = lambda tokens: dataclasses.replace(tokens, cached_tokens=0)  # the second may reuse the first's prefix
    assert uncached(chat.tokens) == uncached(asked.tokens)
    assert chat.focus.to_dict() == asked.focus.to_dict() and chat.focus.dense_frames


def test_focus_rewrites_the_last_user_question_of_a_conversation_in_each_pass(llm, video, grounding, monkeypatch):
    """Pass 1 asks the grounding question and pass 2 the question with the segment, each in place of the last user
    message's text; the system message and earlier turns (the same question included) stay as they were."""
    from dynfocus_infer.chat import conversation_request
    from dynfocus_infer.core.visual_stage import VisualStage
    from dynfocus_infer.focus import focus_prompt_suffix, grounding_question, parse_segments

    grounding("from 20 to 50")
    seen, prompt = [], VisualStage.prompt

    def recording(self, state, context):
        seen.append((state.request.prompt, state.request.text))
        return prompt(self, state, context)
    monkeypatch.setattr(VisualStage, "prompt", recording)
    question = "What happens?"

    def conversation(last):
        return [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": question},
                {"role": "assistant", "content": "Nothing."}, _user(video, last)]

    out = llm.chat(conversation(question), PARAMS, focus="llm")[0]
    assert out.ok, out.error
    render = lambda last: conversation_request(conversation(last), llm.loaded.template, llm.loaded.tokenizer).prompt
    suffix = focus_prompt_suffix(parse_segments("from 20 to 50").segments)
    assert seen == [(render(grounding_question(question)), grounding_question(question)),
                    (render(question + suffix), question)]
    assert render(question).count(question) == 2
    # A question that the template also writes after it ("assistant" in the assistant header): the user's text
    # is rewritten, found where the conversation put it, not by searching the prompt.
    seen.clear()
    question = "assistant"
    asked = conversation_request(conversation(question), llm.loaded.template, llm.loaded.tokenizer)
    assert asked.prompt.rfind(question) > asked.instruction_at >= 0, "the case must hold the text after the question"
    out = llm.chat(conversation(question), PARAMS, focus="llm")[0]
    assert out.ok, out.error
    assert seen == [(render(grounding_question(question)), grounding_question(question)),
                    (render(question + suffix), question)]


def test_focus_on_a_prompt_needs_its_question_as_the_instruction_written_in_it(llm, video):
    prompt = "USER: <image>\nWhat happens? ASSISTANT:"
    with pytest.raises(RequestError, match="needs its question as `instruction`"):
        Request(prompt=prompt, video=video, focus="llm")
    with pytest.raises(RequestError, match="needs its question as `instruction`"):
        Request(prompt=prompt, video=video, focus="llm", instruction="What moves?")
    with pytest.raises(RequestError, match="has no video"):
        Request(prompt="USER: What happens? ASSISTANT:", instruction="What happens?", focus="dpe")
    Request(prompt=prompt, video=video, focus="llm", instruction="What happens?")
    Request(prompt=prompt, video=video, focus="llm", instruction="What happens?", instruction_at=14)
    with pytest.raises(RequestError, match="needs its question as `instruction`"):
        Request(prompt=prompt, video=video, focus="llm", instruction="What happens?", instruction_at=13)
    split = [{"role": "user", "content": [{"type": "text", "text": "Look at"}, {"type": "video", "video": video},
                                          {"type": "text", "text": "and say what happens."}]}]
    bad, no_video = llm.chat([split, [{"role": "user", "content": "Say hello."}]], PARAMS, focus="llm")
    assert not bad.ok and "needs its question as `instruction`" in bad.error
    assert not no_video.ok and "has no video" in no_video.error
