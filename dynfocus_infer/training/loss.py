"""The training forward: frames -> ViT -> Q-Former -> DynFocus connector (training mode: perturbed top-K, DPC-KNN
pooling through autograd) -> visual tokens spliced into the prompt the engine builds -> frozen LLM -> cross-entropy
on the answer tokens.

The prompt is rendered and tokenised by prompt.py exactly as the engine's visual stage does (chat template, visual
tokens at `<image>`), then the answer and the end-of-turn token follow: the model learns to produce what
generation then reads back.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..prompt import render_prompt, tokenize_prompt
from .data import Example


class BatchLoss(NamedTuple):
    loss: torch.Tensor                 # mean over examples of each one's mean answer-token cross-entropy
    per_example: torch.Tensor          # [B], detached
    visual_tokens: tuple


def _answer_ids(loaded, answer: str) -> list:
    ids = loaded.tokenizer(answer, add_special_tokens=False)["input_ids"]
    return list(ids) + list(loaded.eos_token_ids[:1])


def batch_loss(loaded, examples: list[Example]) -> BatchLoss:
    """The loss of `examples` under `loaded` (a presets.LoadedModel whose visual parts are in training mode)."""
    model = loaded.model
    device = model.llm.model.embed_tokens.weight.device
    dtype = model.llm.model.embed_tokens.weight.dtype
    pixels = torch.cat([e.pixels for e in examples]).to(device=device, dtype=dtype)
    frames = [e.pixels.shape[0] for e in examples]
    frame_tokens = model.vit(pixels)
    question_ids, question_mask = loaded.question_tokenizer([e.question for e in examples], device)
    frame_question = torch.repeat_interleave(torch.arange(len(examples), device=device),
                                             torch.tensor(frames, device=device))
    q_emb = model.qformer(frame_tokens, question_ids, question_mask, frame_question).to(frame_tokens.dtype)
    visual = model.connector(frame_tokens[:, 1:], q_emb, frames, check=False)
    pieces, targets, lengths, visual_offset = [], [], [], 0
    with torch.no_grad():
        embed = model.llm.embed
    for b, ex in enumerate(examples):
        text = render_prompt(loaded.template, ex.question, True, loaded.tokenizer)
        parts = tokenize_prompt(loaded.tokenizer, text, add_bos=loaded.add_bos)
        answer = _answer_ids(loaded, ex.answer)
        tokens = visual.tokens[visual_offset:visual_offset + visual.num_tokens[b]]
        visual_offset += visual.num_tokens[b]
        text_after = torch.tensor(parts.after + answer, dtype=torch.int64, device=device)
        before = torch.tensor(parts.before, dtype=torch.int64, device=device)
        with torch.no_grad():
            before_embeds, after_embeds = embed(before), embed(text_after)
        pieces += [before_embeds, tokens.to(dtype), after_embeds]
        length = len(parts.before) + tokens.shape[0] + len(text_after)
        targets.append((sum(lengths) + length - len(answer), torch.tensor(answer, device=device)))
        lengths.append(length)
    cu_seqlens = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    hidden = model.llm.forward_packed(torch.cat(pieces), cu_seqlens, max(lengths))
    losses = []
    for first_answer_row, answer in targets:  # the row before each answer token predicts it
        logits = model.llm.logits(hidden[first_answer_row - 1:first_answer_row - 1 + len(answer)])
        losses.append(F.cross_entropy(logits.float(), answer))
    per_example = torch.stack(losses)
    return BatchLoss(per_example.mean(), per_example.detach(), visual.num_tokens)
