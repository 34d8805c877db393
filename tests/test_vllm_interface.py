"""vLLM's interface: top-level imports, {"prompt", "multi_modal_data"} requests, LLM.chat with content parts,
outputs[i] completions; and the sampling options users expect (n, seed=None, logprobs, prompt_logprobs,
min_tokens, penalties), each checked against a reference."""
import dataclasses

import pytest
import torch

from dynfocus_infer.outputs import Request
from dynfocus_infer.prompt import render_prompt, tokenize_prompt
from dynfocus_infer.sampling import SamplingParams, sampling_masks
from dynfocus_infer.video import write_test_video


@pytest.fixture(scope="module")
def llm():
    from dynfocus_infer import LLM
    return LLM("tiny", num_frames=4, cluster_backend="reference")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm") / "v.mp4"
    write_test_video(path, num_frames=24, fps=8)
    return str(path)


def test_top_level_names_are_the_engines():
    import dynfocus_infer
    from dynfocus_infer import AsyncLLM, LLM, SamplingParams as TopLevel
    from dynfocus_infer.core.async_llm import AsyncLLM as CoreAsync
    from dynfocus_infer.engine import LLM as EngineLLM

    assert LLM is EngineLLM and TopLevel is SamplingParams and AsyncLLM is CoreAsync
    with pytest.raises(AttributeError, match="no attribute 'Bogus'"):
        dynfocus_infer.Bogus


def test_chat_with_a_video_part_equals_the_question_request(llm, video):
    params = SamplingParams(max_tokens=6, temperature=0.7, seed=9)
    question = llm.generate([Request("What happens?", video)], params)[0]
    for part in ({"type": "video", "video": video}, {"type": "video_url", "video_url": {"url": f"file://{video}"}}):
        chat = llm.chat([{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}], params)[0]
        assert chat.ok, chat.error
        assert chat.outputs[0].token_ids == question.token_ids
        assert dataclasses.replace(chat.tokens, cached_tokens=0) == dataclasses.replace(question.tokens, cached_tokens=0)
        # the same prompt as the question's: all of it but its last (partial) KV block of 16 comes from the cache
        assert chat.tokens.prompt_tokens - 16 <= chat.tokens.cached_tokens < chat.tokens.prompt_tokens


def test_vllm_prompt_with_multi_modal_data(llm, video):
    text = render_prompt(llm.loaded.template, "What happens?", True, llm.loaded.tokenizer)
    params = SamplingParams(max_tokens=5)
    out = llm.generate({"prompt": text.replace("<image>", "<video>"), "multi_modal_data": {"video": video}}, params)[0]
    assert out.ok and out.tokens.visual_tokens > 0 and out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].text == out.text
    bad = llm.generate([{"prompt": "no placeholder", "multi_modal_data": {"video": video}},
                        {"prompt": "x", "multi_modal_data": {"audio": 1}}], params)
    assert "exactly once" in bad[0].error and "multi_modal_data must be" in bad[1].error


def test_n_completions_are_distinct_reproducible_and_the_first_is_the_single_one(llm):
    # the tiny random model puts almost all mass on one token: a high temperature spreads it
    params = SamplingParams(max_tokens=8, temperature=50.0, seed=4, n=3, ignore_eos=True)
    out = llm.generate(["Tell me a story."], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    ids = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(ids)) == 3
    single = llm.generate(["Tell me a story."], SamplingParams(max_tokens=8, temperature=50.0, seed=4,
                                                               ignore_eos=True))[0]
    assert list(ids[0]) == single.token_ids
    again = llm.generate(["Other.", "Tell me a story."], params)[1]
    assert [tuple(c.token_ids) for c in again.outputs] == ids
    assert out.tokens.generated_tokens == 24 and out.to_dict()["outputs"][2]["token_ids"] == list(ids[2])


def test_unseeded_requests_draw_fresh_randomness(llm):
    params = SamplingParams(max_tokens=12, temperature=50.0, ignore_eos=True)
    first, second = llm.generate(["Same question.", "Same question."], params)
    assert first.token_ids != second.token_ids
    seeded = SamplingParams(max_tokens=12, temperature=50.0, seed=7, ignore_eos=True)
    assert len({tuple(o.token_ids) for o in llm.generate(["Same question."] * 2, seeded)}) == 1


def test_logprobs_and_prompt_logprobs_equal_a_full_forward(llm):
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=3, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    out = llm.generate(["Hello there."], params)[0]
    text = render_prompt(llm.loaded.template, "Hello there.", False, llm.loaded.tokenizer)
    prompt = tokenize_prompt(llm.loaded.tokenizer, text, add_bos=llm.loaded.add_bos).before
    ids = prompt + out.token_ids
    model = llm.model.llm
    with torch.inference_mode():
        logits = model.prefill(torch.tensor([0, len(ids)], dtype=torch.int32), len(ids),
                               input_ids=torch.tensor(ids), all_logits=True).float()
    reference = logits.log_softmax(-1)
    completion = out.outputs[0]
    assert len(completion.logprobs) == 5
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = reference[len(prompt) - 1 + step]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = row.topk(2)
        assert [entry[t].logprob for t in top.indices.tolist()] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert len(entry) <= 3
    assert completion.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in
                                                               zip(completion.logprobs, completion.token_ids)))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for position in range(1, len(prompt)):
        row = reference[position - 1]
        assert out.prompt_logprobs[position][prompt[position]].logprob == pytest.approx(row[prompt[position]].item(),
                                                                                         abs=1e-4)


def test_min_tokens_holds_back_stop_tokens(llm):
    greedy = llm.generate(["Count."], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    stop_first = SamplingParams(max_tokens=6, stop_token_ids=[greedy[0]], ignore_eos=True)
    assert llm.generate(["Count."], stop_first)[0].token_ids == greedy[:1]
    held = llm.generate(["Count."], SamplingParams(max_tokens=6, stop_token_ids=[greedy[0]], min_tokens=3,
                                                   ignore_eos=True))[0]
    assert greedy[0] not in held.token_ids[:3] and len(held.token_ids) >= 3


class _Seq:
    def __init__(self, params, output_ids, prompt_token_ids=()):
        self.params, self.output_ids, self.prompt_token_ids = params, list(output_ids), list(prompt_token_ids)


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0, 0.0]] * 3)
    seqs = [_Seq(SamplingParams(frequency_penalty=0.5), [1, 1, 4]),
            _Seq(SamplingParams(presence_penalty=1.5), [1, 1, 4]),
            _Seq(SamplingParams(repetition_penalty=2.0), [2, 4], prompt_token_ids=[-1, 3, 3])]
    out = sampling_masks(logits, seqs, eos_token_ids=[5])
    assert out[0].tolist() == [1.0, 1.0, -1.0, 0.5, 2.5, 0.0]
    assert out[1].tolist() == [1.0, 0.5, -1.0, 0.5, 1.5, 0.0]
    assert out[2].tolist() == [1.0, 2.0, -2.0, 0.25, 1.5, 0.0]
    blocked = sampling_masks(logits[:1], [_Seq(SamplingParams(min_tokens=2, stop_token_ids=[2]), [0])], [5])
    assert blocked[0, 2] == -float("inf") and blocked[0, 5] == -float("inf") and blocked[0, 4] == 3.0


@pytest.mark.parametrize("penalty", [dict(repetition_penalty=50.0), dict(frequency_penalty=2.0, presence_penalty=2.0)])
def test_penalties_break_greedy_repetition(llm, penalty):
    plain = llm.generate(["Hi."], SamplingParams(max_tokens=24, ignore_eos=True))[0].token_ids
    penalised = llm.generate(["Hi."], SamplingParams(max_tokens=24, ignore_eos=True, **penalty))[0]
    most = max(plain.count(t) for t in plain)
    assert max(penalised.token_ids.count(t) for t in penalised.token_ids) < most
