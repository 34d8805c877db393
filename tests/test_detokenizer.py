"""Incremental detokenisation equals decoding the whole token list, on random token streams of the real SmolLM2
tokenizer (multi-byte characters split across tokens, special tokens, stop strings)."""
import random

import pytest

from dynfocus_infer.core.detokenizer import IncrementalDetokenizer
from dynfocus_infer.models.smollm2 import load_smollm2_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_smollm2_tokenizer()


def byte_level_ids(tokenizer, rng: random.Random) -> list:
    """Tokens of text rich in multi-byte characters, plus random vocabulary ids (lone UTF-8 fragments included)."""
    text = "".join(rng.choice(["naïve ", "café", "你好", "世界", "🙂", " ok", "\n", "ß", "Ωmega", "1.5"])
                   for _ in range(rng.randint(3, 12)))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for _ in range(rng.randint(0, 10)):
        ids.insert(rng.randrange(len(ids) + 1), rng.randrange(len(tokenizer)))
    return ids


@pytest.mark.parametrize("seed", range(40))
def test_incremental_text_equals_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    ids = byte_level_ids(tokenizer, rng) if seed % 2 else [rng.randrange(len(tokenizer)) for _ in range(40)]
    skip = {tokenizer.eos_token_id}
    detokenizer = IncrementalDetokenizer(tokenizer, skip_ids=skip)
    streamed = ""
    for token in ids:
        detokenizer.add(token)
        streamed += detokenizer.new_text(finished=False)
        assert "\ufffd" not in streamed or "\ufffd" in tokenizer.decode(ids, skip_special_tokens=True)
    detokenizer.finish()
    streamed += detokenizer.new_text(finished=True)
    expected = tokenizer.decode([t for t in ids if t not in skip], skip_special_tokens=True)
    assert detokenizer.text == expected
    assert streamed == expected


@pytest.mark.parametrize("seed", range(20))
def test_stop_strings_cut_where_a_full_decode_finds_them(tokenizer, seed):
    rng = random.Random(100 + seed)
    ids = byte_level_ids(tokenizer, rng)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    if len(full) < 4:
        pytest.skip("too short to hold a stop string")
    start = rng.randrange(len(full) - 2)
    stop = full[start:start + rng.randint(1, 3)]
    detokenizer = IncrementalDetokenizer(tokenizer, stop=[stop])
    streamed, used = "", 0
    for token in ids:
        detokenizer.add(token)
        used += 1
        streamed += detokenizer.new_text(finished=False)
        assert full.find(stop) >= len(streamed) or full.find(stop) < 0, "streamed text past a stop string"
        if detokenizer.stopped:
            break
    detokenizer.finish()
    streamed += detokenizer.new_text(finished=True)
    assert detokenizer.stopped and detokenizer.text == full[:full.find(stop)] == streamed
    # the token that completed the stop string is the first whose prefix decodes to text holding it
    assert stop in tokenizer.decode(ids[:used], skip_special_tokens=True)
    assert stop not in tokenizer.decode(ids[:used - 1], skip_special_tokens=True)
