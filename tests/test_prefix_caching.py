"""Prefix caching (core/block_manager.py): a prompt reuses the K/V blocks of the longest prefix another prompt
already computed. The block manager never hands out a block whose content differs from what the taker's prompt
would have written (checked against a model of every block's content under random admissions, releases and
evictions); through the engine, answers with prefix caching equal those without it, token for token, while the
shared prefixes are really skipped (hits counted); a prompt-logprobs request computes every row; a failed step
forgets every cached prefix."""
import random

import pytest
import torch

from dynfocus_infer.core.block_manager import BlockManager, prompt_block_hashes
from dynfocus_infer.core.sequence import Sequence
from dynfocus_infer.engine import LLM
from dynfocus_infer.errors import ConfigError
from dynfocus_infer.outputs import Request
from dynfocus_infer.sampling import SamplingParams
from dynfocus_infer.video import write_test_video

KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4      # tiny preset: 2 layers, 2 KV heads of 16, fp32, K and V


# -- hashes ------------------------------------------------------------------------------------------------------

def test_block_hashes_follow_content_up_to_the_first_difference():
    torch.manual_seed(0)
    ids = [1, 5, 9] + [-1] * 10 + [7, 8, 3, 4, 6]          # 18 positions: 4 full blocks of 4
    rows = torch.randn(10, 6)
    base = prompt_block_hashes(ids, rows, 4)
    assert len(base) == 4 and len(set(base)) == 4
    assert prompt_block_hashes(ids, rows.clone(), 4) == base
    assert prompt_block_hashes(ids[:-2], rows, 4) == base  # a shorter prompt: its full blocks only
    changed = rows.clone()
    changed[6, 2] += 1e-6                                   # visual row 6 sits at position 9: block 2
    other = prompt_block_hashes(ids, changed, 4)
    assert other[:2] == base[:2] and other[2] != base[2] and other[3] != base[3]
    text = list(ids)
    text[1] = 6                                             # a text token of block 0: every block differs
    assert all(a != b for a, b in zip(prompt_block_hashes(text, rows, 4), base))
    shifted = [1, 5] + [-1] * 10 + [9, 7, 8, 3, 4, 6]          # the same rows one position earlier
    assert all(a != b for a, b in zip(prompt_block_hashes(shifted, rows, 4), base))
    assert prompt_block_hashes([3, 4, 5], None, 4) == []
    with pytest.raises(ValueError, match="10 visual positions but 9 visual rows"):
        prompt_block_hashes(ids, rows[:9], 4)
    with pytest.raises(ValueError, match="0 visual rows"):
        prompt_block_hashes(ids, None, 4)


# -- the block manager against a model of block contents -----------------------------------------------------------

def make_seq(seq_id: int, prompt: list, logprobs: bool = False) -> Sequence:
    params = SamplingParams(max_tokens=4, prompt_logprobs=1 if logprobs else None)
    seq = Sequence(seq_id, f"r{seq_id}", 0, params, 0, torch.zeros(len(prompt), 1), list(prompt), 4)
    seq.prompt_hashes = prompt_block_hashes(prompt, None, 4)
    return seq


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_admissions_never_share_a_block_of_other_content(seed):
    """Prompts drawn from a few shared stems; each step admits, computes a chunk (writing the modelled content of
    every block it fills), or releases a random sequence. A taken cached block must hold exactly what the taker's
    prompt puts there; reference counts and the free/cached/held partition must stay exact."""
    rng = random.Random(seed)
    stems = [[rng.randrange(50) for _ in range(rng.randrange(3, 30))] for _ in range(4)]
    manager = BlockManager(24, 4)
    content = {}                                            # block -> the prompt tokens written in it
    live, next_id, hits = [], 0, 0
    for _ in range(600):
        action = rng.random()
        if action < 0.4:
            prompt = rng.choice(stems)[:rng.randrange(1, 30)] + [rng.randrange(50) for _ in range(rng.randrange(4))]
            seq = make_seq(next_id, prompt, logprobs=rng.random() < 0.1)
            next_id += 1
            if manager.admit(seq):
                hits += seq.num_computed
                assert seq.num_computed < seq.prompt_len and seq.num_computed % 4 == 0
                if seq.params.prompt_logprobs is not None:
                    assert seq.num_computed == 0
                for index, block in enumerate(seq.block_table):
                    assert content[block] == tuple(prompt[index * 4:(index + 1) * 4]), "a block of other content"
                live.append(seq)
        elif action < 0.8 and live:
            seq = rng.choice(live)
            end = min(seq.prompt_len, seq.num_computed + rng.randrange(1, 12))
            if not manager.ensure(seq, end):
                continue
            for position in range(seq.num_computed, end):
                block = seq.block_table[position // 4]
                if position % 4 == 0:
                    content[block] = ()
                content[block] += (seq.prompt_token_ids[position],)
            manager.register(seq, end)
            seq.num_computed = end
        elif live:
            seq = live.pop(rng.randrange(len(live)))
            manager.free(seq)
        held = [b for s in live for b in s.block_table]
        for block in range(manager.num_blocks):
            assert manager._refs[block] == held.count(block)
        assert set(manager._free) | set(manager._cached) | set(held) == set(range(manager.num_blocks))
        assert not (set(manager._free) & set(manager._cached)) and not (set(held) & set(manager._cached))
        assert manager.num_used == len(set(held))
        for digest, block in manager._block_of.items():
            assert manager._hash_of[block] == digest
    assert hits > 0, "the stems were meant to be shared"
    for seq in live:
        manager.free(seq)
    assert manager.num_used == 0 and manager.num_free == manager.num_blocks


def test_cached_blocks_are_evicted_least_recently_released_first():
    manager = BlockManager(7, 4)
    a, b = make_seq(0, list(range(12))), make_seq(1, list(range(100, 112)))
    for seq in (a, b):
        assert manager.admit(seq) and manager.ensure(seq, 12)
        manager.register(seq, 12)
    manager.free(a)                                         # released: a's blocks tail first, then b's
    manager.free(b)
    assert manager.num_used == 0 and manager.num_cached == 6 and manager.num_free == 7
    c = make_seq(2, [200, 201, 202, 203, 204])
    assert manager.admit(c) and manager.ensure(c, 5)        # the free block, then a's tail is evicted
    assert manager.num_cached == 5 and manager.num_used == 2
    again = make_seq(3, list(range(12)) + [5])
    assert manager.admit(again) and again.num_computed == 8  # a's head and middle are still cached
    manager.free(again)
    twin = make_seq(4, list(range(100, 112)) + [9])
    assert manager.admit(twin) and twin.num_computed == 12   # b untouched
    assert manager.prefix_hits == 20 and manager.prefix_queries == 12 + 12 + 5 + 13 + 13
    manager.reset_prefix_cache()
    assert manager.num_cached == 0 and manager.num_used == 5   # c's 2 blocks, twin's 3
    manager.free(twin)
    manager.free(c)
    assert manager.num_free == 7 and manager.num_cached == 0 and not manager._cached


def test_admission_counts_the_idle_cached_blocks_it_takes():
    """A prompt whose cached prefix lies in idle blocks cannot count those blocks as room for its tail; the last
    prompt position is always computed, so a prompt that is exactly a cached prefix recomputes its last block."""
    manager = BlockManager(4, 4)
    a = make_seq(0, list(range(12)))
    assert manager.admit(a) and manager.ensure(a, 12)
    manager.register(a, 12)
    manager.free(a)                                         # 3 idle cached blocks + 1 free
    longer = make_seq(1, list(range(12)) + list(range(50, 58)))   # 20 positions: 5 blocks, 3 of them cached
    assert not manager.admit(longer) and not longer.block_table and manager.num_cached == 3
    same = make_seq(2, list(range(12)))
    assert manager.admit(same) and same.num_computed == 8 and len(same.block_table) == 2
    assert manager.ensure(same, 12) and len(same.block_table) == 3 and manager.num_free == 1
    manager.register(same, 12)                              # its last block repeats a cached one: stays private
    assert manager.num_cached == 3
    manager.free(same)
    assert manager.num_cached == 3 and manager.num_free == 4
    fits = make_seq(3, list(range(12)) + [1, 2, 3])          # 15 positions: 4 blocks, 3 of them cached
    assert manager.admit(fits) and fits.num_computed == 12
    assert manager.ensure(fits, 15) and len(fits.block_table) == 4 and manager.num_free == 0


def test_prefix_caching_is_a_checked_setting():
    with pytest.raises(ConfigError, match="enable_prefix_caching = 'yes' is invalid"):
        LLM("tiny", enable_prefix_caching="yes")


# -- through the engine --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefix")
    paths = []
    for i, scenes in enumerate([2, 4]):
        path = folder / f"v{i}.mp4"
        write_test_video(path, num_frames=16, fps=8, num_scenes=scenes)
        paths.append(str(path))
    return paths


def engines(**kwargs):
    common = dict(num_frames=4, cluster_backend="reference", block_size=8, **kwargs)
    return LLM("tiny", enable_prefix_caching=True, **common), LLM("tiny", enable_prefix_caching=False, **common)


@pytest.mark.parametrize("encoder", ["pool-4x4", "dynfocus"])
def test_questions_on_one_video_share_its_prefix_and_answer_the_same(videos, encoder):
    """Five questions on each of two videos, n = 2 samples each, seeded: the same tokens with and without prefix
    caching. With a question-independent encoder the video's tokens come before the question, so most of the
    prompt is found cached; DynFocus's tokens depend on the question, so only the template's head is shared."""
    cached, plain = engines(visual_encoder=encoder, max_num_batched_tokens=64)
    questions = ["What happens?", "What colour is it?", "Is it moving?", "How many?", "Describe it."]
    requests = [Request(q, v) for v in videos for q in questions]
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=5, n=2, ignore_eos=True)
    got, want = cached.generate(requests, params), plain.generate(requests, params)
    for a, b in zip(got, want):
        assert a.ok and b.ok, (a.error, b.error)
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    stats, prompt = cached.engine.stats(), sum(o.tokens.prompt_tokens for o in got) * 2
    assert stats["prefix_cache_queries"] == prompt
    assert plain.engine.stats()["prefix_cache_hits"] == 0 and plain.engine.blocks.num_cached == 0
    visual = got[0].tokens.visual_tokens
    if encoder == "pool-4x4":      # per video: 9 of 10 sequences find at least the visual tokens' blocks
        assert stats["prefix_cache_hits"] >= 2 * 9 * (visual // 8 * 8 - 8)
    else:                          # the second sample of each request finds its whole prompt but the last block
        assert stats["prefix_cache_hits"] >= len(requests) * (min(o.tokens.prompt_tokens for o in got) - 8) // 8 * 8
    assert all(0 <= o.tokens.cached_tokens < o.tokens.prompt_tokens for o in got)
    assert sum(o.tokens.cached_tokens for o in got) > 0 and all(o.tokens.cached_tokens == 0 for o in want)
    assert cached.engine.blocks.num_used == 0


def test_preemption_and_chunked_prefill_keep_answers_with_shared_blocks(videos):
    """A cache of about 300 tokens in blocks of 8 with prompts sharing their video: preemption releases shared
    blocks while others still hold them, and recomputation finds them again."""
    kwargs = dict(visual_encoder="full", max_model_len=256, kv_cache_memory=300 * KV_BYTES_PER_TOKEN,
                  max_num_seqs=8, max_num_batched_tokens=48, num_frames=1)
    common = dict(cluster_backend="reference", block_size=8)
    cached = LLM("tiny", enable_prefix_caching=True, **common, **kwargs)
    plain = LLM("tiny", enable_prefix_caching=False, **common, **kwargs)
    requests = [Request(q, videos[i % 2]) for i, q in enumerate(["A?", "B?", "C?", "D?", "E?", "F?"])]
    params = [SamplingParams(max_tokens=30 + 7 * i, temperature=0.9, seed=i, ignore_eos=True) for i in range(6)]
    got, want = cached.generate(requests, params), plain.generate(requests, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(o.ok for o in got)
    assert cached.engine.scheduler.num_preemptions > 0, "the budget was meant to force preemption"
    assert cached.engine.stats()["prefix_cache_hits"] > 0
    assert cached.engine.blocks.num_used == 0


def test_a_prompt_logprobs_request_computes_every_row(videos):
    cached, plain = engines(visual_encoder="pool-4x4")
    warm = SamplingParams(max_tokens=2)
    cached.generate([Request("What happens?", videos[0])], warm)
    params = SamplingParams(max_tokens=3, prompt_logprobs=2, logprobs=1, ignore_eos=True)
    hits = cached.engine.stats()["prefix_cache_hits"]
    got = cached.generate([Request("What happens?", videos[0])], params)[0]
    want = plain.generate([Request("What happens?", videos[0])], params)[0]
    assert cached.engine.stats()["prefix_cache_hits"] == hits
    assert len(got.prompt_logprobs) == got.tokens.prompt_tokens == len(want.prompt_logprobs)
    for a, b in zip(got.prompt_logprobs, want.prompt_logprobs):
        assert (a is None) == (b is None)
        if a is not None:
            assert {t: (round(v.logprob, 4), v.rank) for t, v in a.items()} == \
                   {t: (round(v.logprob, 4), v.rank) for t, v in b.items()}
    assert got.token_ids == want.token_ids
    again = cached.generate([Request("What happens?", videos[0])], warm)[0]
    assert again.ok and cached.engine.stats()["prefix_cache_hits"] > hits


def test_a_failed_step_forgets_every_cached_prefix(videos, monkeypatch):
    from dynfocus_infer.core.model_runner import ModelRunner

    cached, _ = engines(visual_encoder="pool-4x4")
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    expected = cached.generate([Request("One?", videos[0])], params)[0].token_ids
    assert cached.engine.blocks.num_cached > 0
    real = ModelRunner._embeddings

    def embeddings(self, chunks, previous=None):
        if any("BOOM" in c.seq.params.stop for c in chunks):
            raise RuntimeError("simulated kernel failure")
        return real(self, chunks, previous)

    monkeypatch.setattr(ModelRunner, "_embeddings", embeddings)
    bad = SamplingParams(max_tokens=4, stop=["BOOM"])
    cached.engine.add_request("bad", Request("Bad?", videos[0]), bad)
    cached.engine.add_request("good", Request("One?", videos[0]), params)
    finals = {}
    while cached.engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in cached.engine.step() if o.finished})
    assert finals["bad"].error == "internal error (RuntimeError): simulated kernel failure"
    assert finals["good"].token_ids == expected
    assert cached.engine.blocks.num_used == 0
    assert cached.engine.blocks.num_cached == 0   # and the two, running alone from then on, published nothing


def test_every_command_that_builds_an_engine_can_turn_it_off():
    from dynfocus_infer.cli import _engine, build_parser

    parser = build_parser()
    for argv in (["answer", "--question", "q"], ["batch", "--input", "i", "--output", "o"],
                 ["serve"], ["eval", "--out", "o"], ["corpus", "--input", "i", "--output", "o"]):
        assert parser.parse_args(argv).no_prefix_caching is False, argv
        assert parser.parse_args(argv + ["--no-prefix-caching"]).no_prefix_caching is True, argv
    args = parser.parse_args(["answer", "--question", "q", "--model", "tiny", "--no-prefix-caching"])
    assert _engine(args).engine.blocks.enable_prefix_caching is False
    args = parser.parse_args(["answer", "--question", "q", "--model", "tiny"])
    assert _engine(args).engine.blocks.enable_prefix_caching is True


def test_an_interrupted_step_leaves_no_unwritten_block_cached(videos, monkeypatch):
    """Ctrl-C during a step: the blocks it published were maybe never written, so every cached prefix is forgotten
    and the same question asked again gets the answer it gets from an engine without prefix caching."""
    from dynfocus_infer.core.model_runner import ModelRunner

    cached, plain = engines(visual_encoder="pool-4x4")
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    cached.generate([Request("One?", videos[0])], params)
    real = ModelRunner.launch

    def interrupted(self, chunks, previous=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelRunner, "launch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cached.generate([Request("Two, a longer question about it?", videos[0])], params)
    monkeypatch.setattr(ModelRunner, "launch", real)
    assert cached.engine.blocks.num_cached == 0 and cached.engine.blocks.num_used == 0
    again = cached.generate([Request("Two, a longer question about it?", videos[0])], params)[0]
    want = plain.generate([Request("Two, a longer question about it?", videos[0])], params)[0]
    assert again.token_ids == want.token_ids


def test_requests_run_without_prefix_caching_when_their_rows_cannot_be_hashed(videos, monkeypatch):
    from dynfocus_infer.core.llm_engine import LLMEngine

    cached, plain = engines(visual_encoder="pool-4x4")

    def out_of_memory(self, prompts):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(LLMEngine, "_visual_rows_on_host", out_of_memory)
    requests = [Request(q, videos[0]) for q in ("One?", "Two?")]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    got = cached.generate(requests, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain.generate(requests, params)]
    assert all(o.ok and o.tokens.cached_tokens == 0 for o in got) and cached.engine.blocks.num_cached == 0
