"""Presets: the random-weight 7B build's byte tokenizer, and configs that match the paper's sizes."""
from dynfocus_infer.config import ModelConfig
from dynfocus_infer.presets import ByteTokenizer


def test_byte_tokenizer_round_trips_text_and_stays_in_range():
    tok = ByteTokenizer()
    text = "What happens in the vidéo? 42"
    ids = tok(text)["input_ids"]
    assert min(ids) >= 3 and max(ids) < 259 and tok.decode(ids) == text
    assert tok.decode([1] + ids + [2]) == text


def test_paper_config_sizes():
    config = ModelConfig()
    assert (config.vit.width, config.vit.depth, config.vit.num_tokens) == (1408, 39, 257)
    assert (config.llm.hidden_size, config.llm.num_layers, config.llm.vocab_size) == (4096, 32, 32000)
    assert config.connector.num_spatial_tokens == 22 and config.connector.num_pooled == 16
