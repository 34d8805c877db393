"""AsyncLLM: requests arriving at any time stream every token, equal what they get alone; leaving a stream early
aborts its request and frees its KV blocks; bad requests end with an error output."""
import asyncio
import time

import pytest

from dynfocus_infer.core.async_llm import AsyncLLM
from dynfocus_infer.engine import LLM
from dynfocus_infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def reference():
    return LLM("tiny", num_frames=4, cluster_backend="reference")


@pytest.fixture()
def served():
    llm = AsyncLLM(LLM("tiny", num_frames=4, cluster_backend="reference"))
    yield llm
    llm.shutdown()


async def collect(llm, request, params, request_id, delay_s=0.0):
    await asyncio.sleep(delay_s)
    return [output async for output in llm.generate(request, params, request_id)]


def test_requests_arriving_at_any_time_stream_every_token_and_match_running_alone(served, reference):
    params = [SamplingParams(max_tokens=n, temperature=0.8, seed=s, ignore_eos=True)
              for n, s in ((14, 1), (6, 2), (10, 3))]
    questions = ["Say hello.", "Count.", "Name a colour."]

    async def main():
        return await asyncio.gather(*(collect(served, q, p, f"q{i}", delay_s=0.05 * i)
                                      for i, (q, p) in enumerate(zip(questions, params))))

    streams = asyncio.run(main())
    for i, outputs in enumerate(streams):
        final = outputs[-1]
        assert final.finished and final.ok and final.request_id == f"q{i}"
        assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
        alone = reference.generate([questions[i]], params[i])[0]
        assert final.token_ids == alone.token_ids and final.text == alone.text
        # every token arrives in its own output, and the deltas add up to the final answer
        assert [len(o.outputs[0].delta_token_ids) for o in outputs] == [1] * params[i].max_tokens
        assert "".join(o.outputs[0].delta_text for o in outputs) == final.text
        assert final.tokens.generated_tokens == params[i].max_tokens and final.timings_ms["decode_steps"] >= 0


def test_leaving_a_stream_early_aborts_it_and_frees_its_kv_blocks(served):
    async def main():
        seen = 0
        async for output in served.generate("Tell a long story.", SamplingParams(max_tokens=500, ignore_eos=True),
                                            "long"):
            seen += 1
            if seen == 3:
                break
        return seen

    assert asyncio.run(main()) == 3
    deadline = time.time() + 10
    while (served.engine.requests or served.engine.blocks.num_used) and time.time() < deadline:
        time.sleep(0.01)
    assert not served.engine.requests and served.engine.blocks.num_used == 0


def test_abort_ends_the_stream_with_reason_abort(served):
    async def main():
        outputs = []
        async for output in served.generate("Go on.", SamplingParams(max_tokens=500, ignore_eos=True), "x"):
            outputs.append(output)
            if len(outputs) == 2:
                await served.abort("x")
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].finish_reason == "abort" and len(outputs[-1].token_ids) < 500


def test_bad_requests_end_with_an_error_output_and_others_answer(served):
    async def main():
        return await asyncio.gather(collect(served, {"question": ""}, None, "bad"),
                                    collect(served, {"prompt": "hi <image>"}, None, "no-video"),
                                    collect(served, "Fine?", SamplingParams(max_tokens=3), "good"))

    bad, no_video, good = asyncio.run(main())
    assert len(bad) == 1 and bad[0].finish_reason == "error" and "non-empty" in bad[0].error
    assert "has no video" in no_video[0].error
    assert good[-1].ok and len(good[-1].token_ids) == 3


def test_stats_report_load_and_kv_usage(served):
    async def main():
        async for output in served.generate("Hi.", SamplingParams(max_tokens=50, ignore_eos=True), "s"):
            if len(output.token_ids) == 3:
                return served.stats()

    during = asyncio.run(main())
    assert during["running"] == 1 and during["kv_blocks_used"] >= 1 and 0 < during["kv_usage"] <= 1
    assert during["max_model_len"] == served.max_model_len == 2048 and during["alive"]
    assert served.model_name == "tiny"
