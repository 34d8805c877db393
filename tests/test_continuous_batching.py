"""The continuous-batching engine (core/): staggered arrivals, different lengths, aborts, preemption and chunked
prefill all give each request the tokens it gets alone; the KV cache stays inside its budget."""
import pytest

from dynfocus_infer.engine import LLM
from dynfocus_infer.errors import ConfigError, RequestError
from dynfocus_infer.outputs import Request
from dynfocus_infer.sampling import SamplingParams
from dynfocus_infer.video import write_test_video
from engine_utils import eager_graph_capture

KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4      # tiny preset: 2 layers, 2 KV heads of 16, fp32, K and V

QUESTIONS = ["Say hello.", "Count to three please.", "What is a cat?", "Name a colour.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def alone_engine():
    return LLM("tiny", num_frames=4, cluster_backend="reference")


@pytest.fixture(scope="module")
def small_engine():
    """Room for about 300 tokens in blocks of 8: a few requests fill it and force preemption."""
    return LLM("tiny", num_frames=4, cluster_backend="reference", block_size=8, max_model_len=256,
               kv_cache_memory=300 * KV_BYTES_PER_TOKEN, max_num_seqs=8)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("cb") / "v.mp4"
    write_test_video(path, num_frames=24, fps=8)
    return str(path)


def params_for(i: int, seeded: bool) -> SamplingParams:
    length = [40, 12, 33, 25, 18][i % 5]
    if seeded:
        return SamplingParams(max_tokens=length, temperature=0.9, top_p=0.95, seed=100 + i, ignore_eos=True)
    return SamplingParams(max_tokens=length, ignore_eos=True)


def run_staggered(llm: LLM, requests: list, params: list, arrive_at: list, abort_at: dict = None) -> dict:
    """Add request i at step arrive_at[i] (abort those in abort_at at that step); final outputs by request id."""
    engine, finals, step = llm.engine, {}, 0
    abort_at = abort_at or {}
    while len(finals) < len(requests):
        for i, when in enumerate(arrive_at):
            if when == step:
                engine.add_request(f"r{i}", requests[i], params[i])
        for request_id, when in abort_at.items():
            if when == step:
                assert engine.abort(request_id)
        for output in engine.step():
            assert engine.blocks.num_used <= engine.blocks.num_blocks
            if output.finished:
                finals[output.request_id] = output
        step += 1
        assert step < 2000, "the engine stopped making progress"
    return finals


@pytest.mark.parametrize("seeded", [False, True])
def test_staggered_arrivals_and_preemption_equal_running_alone(small_engine, alone_engine, video, seeded):
    requests = [Request(q) for q in QUESTIONS] + [Request("What happens?", video)]
    params = [params_for(i, seeded) for i in range(len(requests))]
    preemptions = small_engine.engine.scheduler.num_preemptions
    finals = run_staggered(small_engine, requests, params, arrive_at=[0, 0, 3, 5, 9, 2])
    alone = [alone_engine.generate([r], p)[0] for r, p in zip(requests, params)]
    for i, reference in enumerate(alone):
        assert reference.ok and finals[f"r{i}"].ok, (reference.error, finals[f"r{i}"].error)
        assert finals[f"r{i}"].token_ids == reference.token_ids, i
        assert len(reference.token_ids) == params[i].max_tokens
    assert small_engine.engine.scheduler.num_preemptions > preemptions, "the budget was meant to force preemption"
    assert small_engine.engine.blocks.num_used == 0
    assert small_engine.engine.cache.nbytes <= 300 * KV_BYTES_PER_TOKEN


def test_abort_frees_the_kv_cache_at_once_and_the_others_complete(small_engine, alone_engine):
    requests = [Request(q) for q in QUESTIONS[:3]]
    params = [params_for(i, True) for i in range(3)]
    engine = small_engine.engine
    for i, request in enumerate(requests):
        engine.add_request(f"a{i}", request, params[i])
    for _ in range(4):
        engine.step()
    used = engine.blocks.num_used
    assert engine.abort("a1") and not engine.abort("a1") and not engine.abort("unknown")
    assert engine.blocks.num_used < used
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert finals["a1"].finish_reason == "abort" and 0 < len(finals["a1"].token_ids) < params[1].max_tokens
    for i in (0, 2):
        assert finals[f"a{i}"].token_ids == alone_engine.generate([requests[i]], params[i])[0].token_ids
    assert engine.blocks.num_used == 0


def test_chunked_prefill_equals_one_prefill(alone_engine, video):
    chunked = LLM("tiny", num_frames=4, cluster_backend="reference", max_num_batched_tokens=16, block_size=4)
    requests = [Request("What happens in this video?", video), Request(QUESTIONS[4]), Request(QUESTIONS[1])]
    params = [params_for(i, True) for i in range(3)]
    got = chunked.generate(requests, params)
    assert all(len(o.tokens.__dict__) and o.tokens.prompt_tokens > 16 for o in got)
    assert [o.token_ids for o in got] == [alone_engine.generate([r], p)[0].token_ids for r, p in zip(requests, params)]


def test_request_over_max_model_len_fails_alone(small_engine):
    outputs = small_engine.generate([Request("why " * 300), Request("Fine?")], SamplingParams(max_tokens=5))
    assert not outputs[0].ok and "context holds 256" in outputs[0].error
    assert outputs[1].ok and len(outputs[1].token_ids) >= 1


def test_answers_are_cut_at_max_model_len(small_engine):
    out = small_engine.generate([Request("Hi")], SamplingParams(max_tokens=1000, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.tokens.prompt_tokens + len(out.token_ids) == 256


def test_a_budget_below_one_sequence_is_a_config_error():
    with pytest.raises(ConfigError, match="fewer than one sequence of max_model_len = 256"):
        LLM("tiny", max_model_len=256, kv_cache_memory=100 * KV_BYTES_PER_TOKEN, cluster_backend="reference")


def test_duplicate_request_ids_are_refused(small_engine):
    small_engine.engine.add_request("dup", "Hi?", SamplingParams(max_tokens=1))
    with pytest.raises(RequestError, match="already in the engine"):
        small_engine.engine.add_request("dup", "Hi?", SamplingParams(max_tokens=1))
    while small_engine.engine.has_unfinished_requests():
        small_engine.engine.step()


def test_cuda_graph_buckets_cover_every_batch_size():
    from dynfocus_infer.core.cuda_graphs import batch_buckets

    assert batch_buckets(1) == [1] and batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40] and batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]


def test_running_requests_decode_every_step_while_new_videos_are_encoded(video):
    """ViT work is budgeted per step (here one 4-frame video): a decoding request gains a token at every step while
    videos that arrive later are decoded and encoded, and they answer as they would alone."""
    llm = LLM("tiny", num_frames=4, cluster_backend="reference", max_encode_frames_per_step=4)
    engine = llm.engine
    engine.add_request("text", "Tell a story.", SamplingParams(max_tokens=60, ignore_eos=True))
    while not engine.step():
        pass
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"video{i}", Request("What happens?", video), params)
    finals, text_tokens = {}, 1
    while "text" not in finals:
        outputs = {o.request_id: o for o in engine.step()}
        text_tokens += 1
        assert len(outputs["text"].token_ids) == text_tokens, "the running request missed a step"
        assert len(outputs["text"].outputs[0].delta_token_ids) == 1
        finals.update({k: o for k, o in outputs.items() if o.finished})
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    alone = llm.generate([Request("What happens?", video)], params)[0]
    assert all(finals[f"video{i}"].token_ids == alone.token_ids for i in range(3))


def test_cache_settings_are_checked_and_flash_attn_gets_its_block_size():
    from dynfocus_infer.core.kv_budget import CacheConfig

    assert CacheConfig().resolved(2048).block_size == 16
    assert CacheConfig().resolved(2048, flash_attn=True).block_size == 256
    with pytest.raises(ConfigError, match="multiple of 256"):
        CacheConfig(block_size=16).resolved(2048, flash_attn=True)
    with pytest.raises(ConfigError, match="over the model's context of 2048"):
        CacheConfig(max_model_len=4096).resolved(2048)
    for bad in (dict(block_size=0), dict(max_num_seqs=0), dict(kv_cache_memory=-1), dict(gpu_memory_utilization=1.5)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            CacheConfig(**bad)


@pytest.mark.parametrize("seeded", [False, True])
def test_the_decode_graph_path_equals_running_alone(alone_engine, seeded):
    """The CUDA-graph decode path (static buffers, batch buckets, padding rows on a dummy block) with an eager
    stand-in for capture, so its bookkeeping runs on a CPU: same tokens as each request alone, with preemption."""
    from types import SimpleNamespace

    from dynfocus_infer.core.kv_budget import CacheConfig
    from dynfocus_infer.core.llm_engine import LLMEngine

    replays = []
    eager_capture = eager_graph_capture(replays)

    llm = LLM("tiny", num_frames=4, cluster_backend="reference")
    config = CacheConfig(block_size=8, max_model_len=256, kv_cache_memory=256 * KV_BYTES_PER_TOKEN, max_num_seqs=6)
    engine = LLMEngine(llm.loaded, llm.visual, config, graph_capture=eager_capture)
    assert engine.runner.graphs.buckets == [1, 2, 4, 6]
    requests = [Request(q) for q in QUESTIONS] + [Request("Describe " + "the sky " * 40)]
    params = [params_for(i, seeded) for i in range(len(requests))]
    finals = run_staggered(SimpleNamespace(engine=engine), requests, params, arrive_at=[0, 1, 1, 2, 3, 3])
    for i, request in enumerate(requests):
        assert finals[f"r{i}"].token_ids == alone_engine.generate([request], params[i])[0].token_ids, i
    assert {4, 6} & set(replays), "padded buckets were not exercised"
    assert engine.scheduler.num_preemptions > 0
