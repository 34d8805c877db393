"""The training forward: frames -> ViT -> Q-Former -> DynFocus connector (training mode: perturbed top-K, DPC-KNN
pooling through autograd) -> visual tokens spliced into the prompt the engine builds -> frozen LLM -> cross-entropy
on the answer tokens.

The prompt is rendered and tokenised by prompt.py exactly as the engine's visual stage does (chat template, visual
tokens at `<image>`), then the answer and the end-of-turn token follow: the model learns to produce what
generation then reads back.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..prompt import render_prompt, tokenize_prompt
from .data import Example
from ..models.spatial_merger import grouped_patch_labels
from ..synthetic.scene import SHAPES
from .probe import COLOUR_NAMES, patch_loss, probe_loss


class BatchLoss(NamedTuple):
    loss: torch.Tensor                 # answer + probe_weight * probe + norm_weight * norm
    per_example: torch.Tensor          # [answered] each answered example's mean answer-token cross-entropy, detached
    visual_tokens: tuple
    answer: float                      # mean of per_example
    probe: float                       # the scene probe's loss over every example (0 without a probe)
    patch: float                       # the patch probe's loss over every frame (0 without one)
    norm: float                        # the visual-token scale penalty (below)
    align: float = 0.0                 # the colour-aligned context rods' loss (align_loss; 0 without it)
    kind: float = 0.0                  # the kind-aligned spatial prototypes' loss (kind_loss; 0 without it)


# Visual tokens may be at most this many times the RMS of the LLM's own token embeddings before the scale penalty
# acts. Without it the first run's tokens grew to ~160x (RMS 21 against 0.13): a pre-norm LLM then carries them
# through its residual stream almost untouched, and the LLM's layers barely contextualise them.
NORM_SLACK = 8.0


def _answer_ids(loaded, answer: str) -> list:
    ids = loaded.tokenizer(answer, add_special_tokens=False)["input_ids"]
    return list(ids) + list(loaded.eos_token_ids[:1])


def _scale_penalty(tokens: torch.Tensor, embedding_rms: float) -> torch.Tensor:
    ratio = tokens.float().pow(2).mean(dim=-1).sqrt() / (NORM_SLACK * embedding_rms)
    return torch.relu(torch.log(ratio.clamp_min(1e-6))).pow(2).mean()


# The colour-aligned context rod (--align-weight). The second rod of every frame is question-conditioned (the Q-Former
# reads the question; its queries attend over the frame's spatial prototypes, paper Eqs. 9-10). For a question that
# names a shape (colour, shape and direction questions), each frame that shows that shape has its context rod pulled
# onto the frozen LLM's own embedding of the shape's colour word ("purple"): a classifier over the six colour words by
# squared distance to their embeddings (relative to their mean squared norm), plus that distance itself, which keeps
# the rod at the embeddings' scale (a rod of the right direction at 20x their norm raises the answer loss instead of
# lowering it). For a colour question that word is the answer, and the frozen LLM reads it: with run 6's context rods
# replaced by the answer word's embedding, the answer loss of 48 held-out colour questions fell from 0.28 to 0.07, and
# rose to 3.06 with another colour's (README). Only the colour: the rod is val_projector(a convex combination of the
# frame's prototypes), so the question chooses where it looks, not what it extracts; a rod that had to be the colour
# word for a colour question and the kind word for a shape question about the same shape would sit between them, and
# the mean of the two words' embeddings made the answer loss worse than run 6's for both question types (README).
ALIGN_WORDS = COLOUR_NAMES
ALIGN_SHARPNESS = 5.0


def align_word_ids(loaded, words=ALIGN_WORDS) -> list:
    """The first token of each of `words` as an answer (what _answer_ids starts with)."""
    return [loaded.tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in words]


def word_alignment(loaded, tokens: torch.Tensor, words: Sequence[str], target: torch.Tensor) -> torch.Tensor:
    """tokens [n, llm] pulled onto the frozen LLM's embeddings of words[target]: a classifier over `words` by
    squared distance (relative to their mean squared norm), plus that distance, which keeps the tokens at the
    embeddings' scale."""
    with torch.no_grad():
        ids = torch.tensor(align_word_ids(loaded, words), device=tokens.device)
        embeddings = loaded.model.llm.model.embed_tokens.weight[ids].float()
    scale = embeddings.pow(2).sum(dim=-1).mean()
    distance = (tokens.float()[:, None, :] - embeddings[None]).pow(2).sum(dim=-1) / scale   # [n, words]
    return F.cross_entropy(-ALIGN_SHARPNESS * distance, target) + distance.gather(1, target[:, None]).mean()


def align_loss(loaded, visual, examples: list[Example]) -> torch.Tensor:
    """The colour-aligned context rods' loss (above) over every frame of `examples` that shows the shape its question
    names; `visual` is the encoder's output for them (its last token of a frame is the frame's context rod). Zero when
    no example has such a frame."""
    tokens = visual.tokens
    device = tokens.device
    videos, times, answers = [], [], []
    for b, ex in enumerate(examples):
        if ex.named_frames is None:
            continue
        shown = torch.nonzero(ex.named_frames).flatten().tolist()  # host tensor: no device read
        videos += [b] * len(shown)
        times += shown
        answers += [ALIGN_WORDS.index(ex.named_colour)] * len(shown)
    if not videos:
        return tokens.new_zeros(())
    video = torch.tensor(videos, device=device)
    rows = visual.token_offsets[video] + visual.frame_token_offsets[video, torch.tensor(times, device=device) + 1] - 1
    return word_alignment(loaded, tokens[rows], ALIGN_WORDS, torch.tensor(answers, device=device))


# The kind-aligned spatial prototypes (--kind-weight). A keyframe's cones are mm_projector of its spatial prototypes
# G_t (the merger's two DPC-KNN layers over the patches) and its event's pooled tokens. A prototype whose patches are
# mostly one shape (the patch labels, from the scene) is pulled, through mm_projector, onto the frozen LLM's
# embedding of that shape's kind word ("triangle"), in every frame (non-keyframes' G_t feeds their rods through the
# same projector). The context rods carry the colour word (align_loss) through vlm_att_val_projector: a prototype
# reaches the LLM through two different projectors, so it can carry two words, one each.
KIND_WORDS = tuple(SHAPES)
KIND_MIN_SHARE = 0.5   # a prototype is labelled when more than this share of its patches shows one kind of shape


def kind_loss(loaded, patch_tokens: torch.Tensor, examples: list[Example]) -> torch.Tensor:
    """The kind-aligned spatial prototypes' loss (above) over every frame of `examples`; patch_tokens [sum T, N, C]
    the ViT's patch tokens of their frames (CLS dropped). Zero when no prototype is mostly one shape."""
    connector = loaded.model.connector
    spatial = connector.merge.prototypes(patch_tokens)
    patch_kind = torch.cat([ex.targets["patch_kind"] for ex in examples])            # [sum T, N]; 0: background
    labels = grouped_patch_labels(patch_kind, spatial.first_assignment, spatial.second_of_first,
                                  connector.config.spatial_centers[1], 1 + len(KIND_WORDS),
                                  min_share=KIND_MIN_SHARE)
    shaped = labels > 0
    if not bool(shaped.any()):
        return patch_tokens.new_zeros(())
    tokens = connector.mm_projector(spatial.grouped[shaped])
    return word_alignment(loaded, tokens, KIND_WORDS, labels[shaped] - 1)


def batch_loss(loaded, examples: list[Example], *, answered: int = None, probe=None, probe_weight: float = 1.0,
               norm_weight: float = 0.0, patch_probe=None, patch_weight: float = 1.0, encoder=None,
               align_weight: float = 0.0, kind_weight: float = 0.0) -> BatchLoss:
    """The loss of `examples` under `loaded` (a presets.LoadedModel whose visual parts are in training mode): the
    answer loss of the first `answered` (default all) through the frozen LLM, the scene probe's loss of all of them
    and the patch probe's loss of all their frames (training/probe.py, when given) and the scale penalty of their
    visual tokens. encoder: what makes the visual tokens (default the DynFocus connector; a baseline of
    models/baselines.py trains for its own token layout). align_weight > 0 adds the colour-aligned context rods' loss
    (align_loss) of all the examples, the probe-only ones included (the Q-Former reads every example's question);
    kind_weight > 0 the kind-aligned spatial prototypes' loss (kind_loss) of all their frames (needs their patch
    labels)."""
    answered = len(examples) if answered is None else answered
    model = loaded.model
    device = model.llm.model.embed_tokens.weight.device
    dtype = model.llm.model.embed_tokens.weight.dtype
    pixels = torch.cat([e.pixels for e in examples]).to(device=device, dtype=dtype)
    frames = [e.pixels.shape[0] for e in examples]
    frame_tokens = model.vit(pixels)
    question_ids, question_mask = loaded.question_tokenizer([e.question for e in examples], device)
    frame_question = torch.repeat_interleave(torch.arange(len(examples), device=device),
                                             torch.tensor(frames, device=device))
    encoder = encoder or model.connector
    q_emb = None
    if getattr(encoder, "uses_qformer", True):  # full / pool-GxG / uniform-K never read it
        q_emb = model.qformer(frame_tokens, question_ids, question_mask, frame_question).to(frame_tokens.dtype)
    visual = encoder(frame_tokens[:, 1:], q_emb, frames, check=False)
    pieces, targets, lengths, visual_offset = [], [], [], 0
    with torch.no_grad():
        embed = model.llm.embed
    for b, ex in enumerate(examples[:answered]):
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
    total = per_example.mean()
    probe_value = norm_value = patch_value = align_value = kind_value = torch.zeros((), device=device)
    if align_weight:
        align_value = align_loss(loaded, visual, examples)
        total = total + align_weight * align_value
    if kind_weight:
        kind_value = kind_loss(loaded, frame_tokens[:, 1:], examples)
        total = total + kind_weight * kind_value
    if patch_probe is not None:
        patch_value = patch_loss(patch_probe(frame_tokens[:, 1:]), [e.targets for e in examples])
        total = total + patch_weight * patch_value
    if probe is not None:
        probe_value = probe_loss(probe(visual.tokens, visual.num_tokens), [e.targets for e in examples])
        total = total + probe_weight * probe_value
    if norm_weight:
        embedding_rms = model.llm.model.embed_tokens.weight.detach().float().pow(2).mean().sqrt().item()
        norm_value = _scale_penalty(visual.tokens, embedding_rms)
        total = total + norm_weight * norm_value
    return BatchLoss(total, per_example.detach(), visual.num_tokens, per_example.mean().item(),
                     probe_value.item(), patch_value.item(), norm_value.item(), align_value.item(), kind_value.item())
