"""Question tokenizer of the Q-Former: bert-base-uncased WordPiece, as LLaMA-VID's `vlm_att_tokenlizer`.

LLaMA-VID / DynFocus build it with `BertTokenizer.from_pretrained("bert-base-uncased", truncation_side="left")`
and add `[DEC]` as the bos token (LAVIS does the same), growing the vocabulary from 30522 to 30523 = the Q-Former's
word-embedding rows. `[DEC]` is never placed in a question (BERT adds only [CLS] ... [SEP]); it matters for the
vocabulary size. Questions are padded to the longest and truncated on the left to 256 tokens, keeping their end.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch

from ..errors import CheckpointError, ConfigError, RequestError

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEC_TOKEN = "[DEC]"


def _bert_wordpiece(vocab_file: Path, truncation_side: str):
    # transformers 5 has one BertTokenizer (fast) taking `vocab`; 4.x has BertTokenizerFast taking `vocab_file`.
    try:
        from transformers import BertTokenizerFast as tokenizer_cls
    except ImportError:  # pragma: no cover - every supported transformers has it
        from transformers import BertTokenizer as tokenizer_cls
    params = inspect.signature(tokenizer_cls.__init__).parameters
    key = "vocab" if "vocab" in params else "vocab_file"
    return tokenizer_cls(**{key: str(vocab_file)}, do_lower_case=True, truncation_side=truncation_side)


class QuestionTokenizer:
    """Questions -> (input_ids, attention_mask) [B, L] long, right-padded, with [CLS] ... [SEP]."""

    def __init__(self, vocab_file: Union[str, Path], *, max_length: int = 256):
        vocab_file = Path(vocab_file)
        if vocab_file.is_dir():
            vocab_file = vocab_file / "vocab.txt"
        if not vocab_file.is_file():
            raise CheckpointError(f"no WordPiece vocabulary at {vocab_file}: pass the bert-base-uncased vocab.txt "
                                  f"or the directory holding it")
        if max_length < 3:
            raise ConfigError(f"max_length = {max_length} is invalid: expected >= 3 ([CLS], a token, [SEP])")
        self.max_length, self.vocab_file = max_length, vocab_file
        self._tokenizer = _bert_wordpiece(vocab_file, truncation_side="left")
        missing = [t for t in BERT_SPECIAL_TOKENS[:4] if t not in self._tokenizer.get_vocab()]
        if missing:
            raise CheckpointError(f"{vocab_file} lacks the BERT special tokens {missing}: is it a BERT vocabulary?")
        self._tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})

    @property
    def vocab_size(self) -> int:
        """Rows the Q-Former word embedding needs: the file's tokens plus [DEC] (30523 for bert-base-uncased)."""
        return len(self._tokenizer)

    @property
    def dec_token_id(self) -> int:
        return self._tokenizer.convert_tokens_to_ids(DEC_TOKEN)

    @property
    def pad_token_id(self) -> int:
        return self._tokenizer.pad_token_id

    def __call__(self, questions: Sequence[str],
                 device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(questions, str) or not all(isinstance(q, str) for q in questions) or not questions:
            raise RequestError("questions must be a non-empty list of strings")
        encoded = self._tokenizer(list(questions), padding="longest", truncation=True, max_length=self.max_length,
                                  return_tensors="pt")
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def write_vocab(path: Union[str, Path], words: Iterable[str]) -> Path:
    """Writes a BERT vocab.txt (special tokens first, then `words`, one per line) for tests and tiny models.
    `path` may be a directory (vocab.txt is created in it) or a file name."""
    path = Path(path)
    if path.is_dir():
        path = path / "vocab.txt"
    tokens = list(BERT_SPECIAL_TOKENS) + [w for w in words if w not in BERT_SPECIAL_TOKENS]
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path
