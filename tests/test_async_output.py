"""The one-step output lag (LLMEngine async_output, the default on CUDA): a step's tokens reach the host after the
next step is launched, whose decodes read their inputs from the device. Forced on here, on a CPU, every request must
get exactly the tokens, text, logprobs and finish reasons it gets with each step resolved at once, through staggered
arrivals, preemption, aborts, EOS, stop strings, penalties, min_tokens and the graph path."""
from types import SimpleNamespace

import pytest
import torch

from dynfocus_infer.core import model_runner
from dynfocus_infer.core.kv_budget import CacheConfig
from dynfocus_infer.core.llm_engine import LLMEngine
from dynfocus_infer.engine import LLM
from dynfocus_infer.outputs import Request
from dynfocus_infer.sampling import SamplingParams
from dynfocus_infer.video import write_test_video
from engine_utils import eager_graph_capture

KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4      # tiny preset: 2 layers, 2 KV heads of 16, fp32, K and V
QUESTIONS = ["Say hello.", "Count to three please.", "What is a cat?", "Name a colour.", "Why is the sky blue?",
             "Tell me a story about a dog."]


@pytest.fixture(scope="module")
def reference():
    return LLM("tiny", num_frames=4, cluster_backend="reference", async_output=False)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("lag") / "v.mp4"
    write_test_video(path, num_frames=24, fps=8)
    return str(path)


def lagged_engine(**cache) -> LLM:
    config = dict(block_size=8, max_model_len=256, kv_cache_memory=300 * KV_BYTES_PER_TOKEN, max_num_seqs=8)
    config.update(cache)
    return LLM("tiny", num_frames=4, cluster_backend="reference", async_output=True, **config)


def mixed_params(i: int, eos_token: int) -> SamplingParams:
    """Every option that reads the generated tokens: EOS and stop tokens (a seeded row is forced to end early on
    an id it samples often), penalties, min_tokens, logprobs, n > 1."""
    options = [
        dict(max_tokens=40, ignore_eos=True),
        dict(max_tokens=30, temperature=0.9, seed=7, stop_token_ids=[eos_token]),
        dict(max_tokens=25, temperature=1.0, seed=3, repetition_penalty=1.3, frequency_penalty=0.5,
             presence_penalty=0.4, ignore_eos=True),
        dict(max_tokens=20, temperature=0.8, seed=11, min_tokens=6, logprobs=3, stop_token_ids=[eos_token]),
        dict(max_tokens=33, temperature=0.7, seed=5, n=2, ignore_eos=True),
        dict(max_tokens=18, ignore_eos=True, logprobs=2),
    ]
    return SamplingParams(**options[i % len(options)])


def run(engine, requests, params, arrive_at, abort_at=None) -> dict:
    finals, step, abort_at = {}, 0, abort_at or {}
    streamed = {}
    while len(finals) < len(requests):
        for i, when in enumerate(arrive_at):
            if when == step:
                engine.add_request(f"r{i}", requests[i], params[i])
        for request_id, when in abort_at.items():
            if when == step:
                assert engine.abort(request_id)
        for output in engine.step():
            assert engine.blocks.num_used <= engine.blocks.num_blocks
            streamed.setdefault(output.request_id, []).extend(output.outputs[0].delta_token_ids)
            if output.finished:
                finals[output.request_id] = output
        step += 1
        assert step < 3000, "the engine stopped making progress"
    for request_id, output in finals.items():     # every token streamed once, in order, as it reached the host
        assert streamed[request_id] == output.token_ids, request_id
    return finals


def common_stop_token(reference, request) -> int:
    """A token the seeded row samples early, so that stopping on it ends the request mid-answer."""
    probe = reference.generate([request], SamplingParams(max_tokens=30, temperature=0.9, seed=7,
                                                         ignore_eos=True))[0]
    return probe.token_ids[len(probe.token_ids) // 3]


def assert_same(final, alone, label):
    assert final.ok and alone.ok, (label, final.error, alone.error)
    assert len(final.outputs) == len(alone.outputs), label
    for got, want in zip(final.outputs, alone.outputs):
        assert got.token_ids == want.token_ids, label
        assert got.text == want.text, label
        assert got.finish_reason == want.finish_reason, label
        if want.logprobs is not None:
            assert [sorted(e) for e in got.logprobs] == [sorted(e) for e in want.logprobs], label
            for g, w in zip(got.logprobs, want.logprobs):
                for token, logprob in w.items():
                    assert g[token].rank == logprob.rank, label
                    assert abs(g[token].logprob - logprob.logprob) <= 1e-5 * max(1.0, abs(logprob.logprob)), label


def test_the_lag_gives_every_request_what_it_gets_resolved_at_once(reference, video):
    requests = [Request(q) for q in QUESTIONS] + [Request("What happens in the video?", video)]
    stop = common_stop_token(reference, requests[1])
    params = [mixed_params(i, stop) for i in range(len(requests))]
    llm = lagged_engine()
    preemptions = llm.engine.scheduler.num_preemptions
    finals = run(llm.engine, requests, params, arrive_at=[0, 0, 2, 3, 5, 1, 4])
    alone = [reference.generate([r], p)[0] for r, p in zip(requests, params)]
    for i, want in enumerate(alone):
        assert_same(finals[f"r{i}"], want, i)
    assert finals["r1"].finish_reason == "stop" and len(finals["r1"].token_ids) < params[1].max_tokens
    assert llm.engine.scheduler.num_preemptions > preemptions, "the budget was meant to force preemption"
    assert llm.engine.blocks.num_used == 0 and llm.engine._pending is None


def test_stop_strings_and_aborts_under_the_lag(reference, monkeypatch):
    """The tiny model answers newlines (greedy) or a repeated word (with a repetition penalty): stop strings that
    span several tokens end both mid-answer. The penalised sequence's stop is found before the step is scheduled,
    so no step ever holds a sequence that has ended (its blocks gone): no step raises."""
    raised, launch = [], model_runner.ModelRunner.launch

    def watched_launch(self, chunks, previous=None):
        try:
            return launch(self, chunks, previous)
        except Exception as error:
            raised.append(error)
            raise

    monkeypatch.setattr(model_runner.ModelRunner, "launch", watched_launch)
    requests = [Request(q) for q in QUESTIONS[:4]]
    params = [SamplingParams(max_tokens=30, ignore_eos=True, stop=["\n" * 8]),
              SamplingParams(max_tokens=40, ignore_eos=True), SamplingParams(max_tokens=35, ignore_eos=True),
              SamplingParams(max_tokens=30, ignore_eos=True, repetition_penalty=2.0, stop=["sinconsinc"])]
    llm = lagged_engine()
    finals = run(llm.engine, requests, params, arrive_at=[0, 0, 1, 2], abort_at={"r1": 6})
    assert finals["r1"].finish_reason == "abort" and 0 < len(finals["r1"].token_ids) < 40
    for i in (0, 2, 3):
        assert_same(finals[f"r{i}"], reference.generate([requests[i]], params[i])[0], i)
    for i in (0, 3):
        assert finals[f"r{i}"].finish_reason == "stop" and 1 < len(finals[f"r{i}"].token_ids) < 30, i
        assert params[i].stop[0] not in finals[f"r{i}"].text
    assert llm.engine.blocks.num_used == 0
    assert not raised, raised


def test_a_child_that_stops_early_drops_its_lagged_row(reference):
    """n = 3: child 0 stops on a token the others never sample; the row the lag computed for it after its stop
    must not reach its output while its siblings decode on."""
    request = Request("Count to three please.")
    probe = reference.generate([request], SamplingParams(max_tokens=20, ignore_eos=True, temperature=1.0, seed=9,
                                                         n=3))[0]
    others = set(probe.outputs[1].token_ids) | set(probe.outputs[2].token_ids)
    stop = next(t for t in probe.outputs[0].token_ids[1:-2] if t not in others)
    params = SamplingParams(max_tokens=20, ignore_eos=True, temperature=1.0, seed=9, n=3, stop_token_ids=[stop])
    llm = lagged_engine()
    final = run(llm.engine, [request], [params], arrive_at=[0])["r0"]
    assert_same(final, reference.generate([request], params)[0], "n=3")
    assert [c.finish_reason for c in final.outputs] == ["stop", "length", "length"]
    assert final.outputs[0].token_ids[-1] == stop and len(final.outputs[0].token_ids) < 20


def test_steps_are_launched_before_the_previous_tokens_are_read(monkeypatch):
    """The order of events: launch k + 1, then resolve k; a decode's input id is the previous step's device token;
    max_tokens never costs an extra row, EOS or a stop at most one per sequence."""
    events = []
    launch, resolve = model_runner.ModelRunner.launch, model_runner.PendingSample.resolve

    def logged_launch(self, chunks, previous=None):
        events.append(("launch", sum(c.length for c in chunks), previous is not None))
        return launch(self, chunks, previous)

    def logged_resolve(self):
        events.append(("resolve", len(self.seqs)))
        return resolve(self)

    monkeypatch.setattr(model_runner.ModelRunner, "launch", logged_launch)
    monkeypatch.setattr(model_runner.PendingSample, "resolve", logged_resolve)
    llm = lagged_engine()
    outputs = llm.generate([Request("Say hello.")], SamplingParams(max_tokens=10, ignore_eos=True))
    assert len(outputs[0].token_ids) == 10
    launches = [e for e in events if e[0] == "launch"]
    assert len(launches) == 10, "one prefill and nine decodes: the lag must not add a row at max_tokens"
    assert all(e[2] for e in launches[1:]), "decodes after the first read the previous step's device tokens"
    kinds = [e[0] for e in events]
    assert kinds[:3] == ["launch", "launch", "resolve"] and kinds[-1] == "resolve"


def test_the_graph_path_reads_pending_tokens_from_the_device(reference):
    replays = []
    eager_capture = eager_graph_capture(replays)

    llm = LLM("tiny", num_frames=4, cluster_backend="reference")
    config = CacheConfig(block_size=8, max_model_len=256, kv_cache_memory=256 * KV_BYTES_PER_TOKEN, max_num_seqs=6)
    engine = LLMEngine(llm.loaded, llm.visual, config, graph_capture=eager_capture, async_output=True)
    requests = [Request(q) for q in QUESTIONS[:5]]
    params = [SamplingParams(max_tokens=[20, 14, 25, 9, 17][i], temperature=0.8, seed=i, ignore_eos=True)
              for i in range(5)]
    finals = run(engine, requests, params, arrive_at=[0, 1, 1, 2, 3])
    for i, request in enumerate(requests):
        assert_same(finals[f"r{i}"], reference.generate([request], params[i])[0], i)
    assert replays, "the graph path did not run"


def test_pending_sample_copies_once_and_resolves_in_order():
    seqs = [SimpleNamespace(seq_id=i, num_output_tokens=i, params=SamplingParams(logprobs=1 if i else None))
            for i in range(3)]
    tokens = torch.tensor([5, 9, 2])
    logits = torch.randn(3, 11)
    pending = model_runner.PendingSample(seqs, tokens, model_runner.ModelRunner._logprob_tensors(seqs, logits, tokens))
    tokens.fill_(-1)                      # the copy was taken at launch: later writes to the device tensor are unseen
    got = pending.resolve()
    assert [g.token_id for g in got] == [5, 9, 2] and got[0].logprobs is None
    logp = logits.log_softmax(-1)
    assert abs(got[1].logprobs[9].logprob - logp[1, 9].item()) < 1e-6
    assert got[1].logprobs[9].rank == int((logp[1] > logp[1, 9]).sum()) + 1
    assert pending.sample_index == [0, 1, 2] and pending.row_of == {0: 0, 1: 1, 2: 2}


def test_a_failing_step_under_the_lag_is_pinned_on_its_request(reference, monkeypatch):
    """As without the lag: the step that raises is retried with each sequence alone; the tokens of the step
    before it (still on their way when it raised) are kept."""
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=3)
    expected = [o.token_ids for o in reference.generate(["One?", "Two?"], params)]
    real = model_runner.ModelRunner._embeddings

    def embeddings(self, chunks, previous=None):
        if any("BOOM" in c.seq.params.stop and c.seq.num_output_tokens >= 3 for c in chunks):
            raise RuntimeError("simulated kernel failure")
        return real(self, chunks, previous)

    monkeypatch.setattr(model_runner.ModelRunner, "_embeddings", embeddings)
    llm = lagged_engine()
    bad = SamplingParams(max_tokens=10, temperature=1.0, seed=3, stop=["BOOM"])
    outputs = llm.generate(["One?", "Bad?", "Two?"], [params, bad, params])
    assert [outputs[0].token_ids, outputs[2].token_ids] == expected
    assert outputs[1].error == "internal error (RuntimeError): simulated kernel failure"
    assert llm.engine.blocks.num_used == 0 and not llm.engine.scheduler.has_work() and llm.engine._pending is None
