"""Focus inference inside the engine (DESIGN.md section 13): the state machine of a request with focus="llm" or
focus="dpe", hooked into the visual stage (frames, features, visual tokens) and the engine (the end of pass 1).

The phases of a focus request (FocusState.phase):
- "sparse": the request's usual frames are decoded and go through the ViT like any request's; their features stay
  in the request's frame store (stream frame index -> ViT features, `FocusState.store`). Then
  llm: the connector and the LLM run pass 1: the grounding question, greedy, at most `grounding_tokens` tokens;
  dpe: the Q-Former, the temporal events and the event scorer choose the segment at once (no LLM pass).
- "grounding" (llm): pass 1 runs in the scheduler like any sequence, but its tokens are not streamed. When it ends
  (`finish_grounding`), its answer is parsed into segments.
- "dense": the dense frames of the segments that the store lacks are decoded by index (random access) and only they
  go through the ViT; the store then holds every frame of the answer.
- "answer": the store's features in frame order go through the Q-Former and the connector (dpe: every dense frame a
  keyframe) and the LLM answers the caller's question (llm: with the focus suffix). A fallback (no usable segment)
  answers the unchanged question over the sparse frames, without decoding or encoding anything again.
A frame sampled both sparsely and densely is encoded once. The DynFocus connector shows it once (it has no
separate low / high-frequency streams, so a second copy would only cost tokens); a SlowFocus model gets the authors'
merged order, where such a frame appears twice, once in each stream, and its low / high-frequency lists and frame
times (RequestState.frame_times / frequency_rows) for the mixing attention.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import ConfigError, RequestError
from ..focus import dense_frame_indices, focus_prompt_suffix, grounding_question, merge_frame_indices, parse_segments
from ..focus.event_grounding import add_keyframes, best_segments, check_keyframe_layout, frame_scores
from ..outputs import FocusInfo, Request
from ..sampling import SamplingParams


def asked(request: Request) -> str:
    """The question a focus request asks: its question, or a prompt request's instruction."""
    return request.question if request.question is not None else request.instruction


def ask(request: Request, question: str, instruction: Optional[str] = None) -> Request:
    """`request` asking `question` instead of its own: a question request's question; a prompt request's
    instruction, rewritten where the prompt holds it (`instruction_at`, else its last occurrence), and the Q-Former
    then reads `question` unless `instruction` is given. A question request's Q-Former text is `instruction` (None:
    the question)."""
    if request.question is not None:
        return dataclasses.replace(request, question=question, instruction=instruction or request.instruction)
    at = request.instruction_at if request.instruction_at is not None else request.prompt.rfind(request.instruction)
    prompt = request.prompt[:at] + question + request.prompt[at + len(request.instruction):]
    return dataclasses.replace(request, prompt=prompt, instruction=instruction or question, instruction_at=at)


@dataclass(frozen=True)
class FocusConfig:
    """Engine-wide focus knobs. dense_frames: frames sampled in the segments (split between them; the authors'
    20); grounding_tokens: llm pass 1's token limit; question_weight, padding (a fraction of the video on each
    side of a run), num_runs: the dpe grounding (focus/event_grounding.py)."""

    dense_frames: int = 20
    grounding_tokens: int = 24
    question_weight: float = 0.5
    padding: float = 0.05
    num_runs: int = 1

    def __post_init__(self):
        for name in ("dense_frames", "grounding_tokens", "num_runs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"FocusConfig.{name} = {value!r} is invalid: expected an integer >= 1")
        if not 0.0 <= self.question_weight < float("inf"):
            raise ConfigError(f"FocusConfig.question_weight = {self.question_weight!r} is invalid: expected a "
                              f"finite number >= 0")
        if not 0.0 <= self.padding <= 1.0:
            raise ConfigError(f"FocusConfig.padding = {self.padding!r} is invalid: expected a fraction in [0, 1]")


@dataclass(eq=False)
class FocusState:
    """One focus request's progress; `request` / `params` are the caller's (the state holds pass 1's meanwhile)."""

    request: Request
    params: SamplingParams
    info: FocusInfo
    phase: str = "sparse"
    num_source_frames: int = 0
    store: Optional[torch.Tensor] = None                  # ViT features [F, 257, C] of the frames in store_rows
    store_rows: dict = field(default_factory=dict)        # stream frame index -> row of store
    frame_order: list = field(default_factory=list)       # the answer's frames (stream indices, increasing)
    new_frames: list = field(default_factory=list)        # frames being decoded by index for the answer
    dense_positions: list = field(default_factory=list)   # positions in frame_order of the dense frames
    dense_submitted: Optional[float] = None               # when the dense frames went to the decoder

    @property
    def mode(self) -> str:
        return self.info.mode


class FocusStage:
    """The focus hooks of one VisualStage (`visual`): it owns the video loader, the encoders and the queues."""

    def __init__(self, visual, config: Optional[FocusConfig] = None):
        self.visual, self.config = visual, config or FocusConfig()

    # -- hooks of the visual stage ---------------------------------------------------------------------------

    def begin(self, state) -> None:
        """A new focus request: llm runs pass 1 as the request's first life (grounding question, greedy)."""
        request = state.request
        if request.focus == "dpe":
            if self.visual.model.family != "dynfocus":
                raise RequestError(f"focus='dpe' needs a DynFocus model (its events choose the segment); "
                                   f"{self.visual.loaded.name} is a {self.visual.model.family} model: use focus='llm'")
            if self.visual.encoder is not self.visual.model.connector:
                raise RequestError("focus='dpe' needs the DynFocus connector (visual_encoder 'dynfocus'): its events "
                                   "choose the segment; use focus='llm' with a token-count baseline")
            check_keyframe_layout(self.visual.model.connector)
        state.focus = FocusState(request, state.params, FocusInfo(request.focus))
        if request.focus == "llm":
            state.request = ask(request, grounding_question(asked(request)))
            state.params = SamplingParams(max_tokens=self.config.grounding_tokens)

    @staticmethod
    def decode_start(state) -> float:
        """When the decode that just finished began: the request's, or its dense frames' submission."""
        focus = state.focus
        return state.decode_submitted if focus is None or focus.phase != "dense" else focus.dense_submitted

    def on_decoded(self, state, frames) -> None:
        focus = state.focus
        if focus.phase == "sparse":
            focus.info.sparse_frames = frames.frame_indices.tolist()
            focus.num_source_frames = frames.num_source_frames
        else:
            focus.info.frames_decoded += frames.frames.shape[0]

    def on_encoded(self, state, features: torch.Tensor) -> None:
        """New ViT features of a focus request: into its store; in the dense phase the answer's features follow."""
        focus = state.focus
        if focus.phase == "sparse":
            focus.store = features
            focus.store_rows = {index: row for row, index in enumerate(focus.info.sparse_frames)}
            return
        base = len(focus.store_rows)
        focus.store = torch.cat([focus.store, features])
        focus.store_rows.update({index: base + row for row, index in enumerate(focus.new_frames)})
        focus.info.frames_encoded += features.shape[0]
        self._to_answer(state)

    def take_grounding(self, batch: list) -> list:
        """The dpe requests of `batch` whose sparse frames are encoded: their segment is chosen now (one batched
        Q-Former call) and they go on to their dense frames; returned so the caller does not connect them."""
        grounding = [s for s in batch if s.focus is not None and s.focus.mode == "dpe" and s.focus.phase == "sparse"
                     and s.features is not None]
        if not grounding:
            return []
        visual, config = self.visual, self.config
        frames = [s.features.shape[0] for s in grounding]
        frame_tokens = torch.cat([s.features for s in grounding])
        question_ids, question_mask = visual.loaded.question_tokenizer([s.request.text for s in grounding],
                                                                       visual.device)
        frame_question = torch.repeat_interleave(torch.arange(len(grounding), device=visual.device),
                                                 torch.tensor(frames, device=visual.device))
        with torch.inference_mode():
            q_emb = visual.model.qformer(frame_tokens, question_ids, question_mask, frame_question)
            for state, tokens, queries in zip(grounding, frame_tokens.split(frames), q_emb.split(frames)):
                focus = state.focus
                event_of_frame, scores = frame_scores(visual.model.connector, tokens[:, 1:], queries,
                                                      config.question_weight)
                segments = best_segments(event_of_frame, scores, focus.info.sparse_frames, focus.num_source_frames,
                                         num_runs=config.num_runs, padding=config.padding)
                focus.info.status, focus.info.segments = "events", segments
                self._plan(state, self._dense(segments, focus.num_source_frames))
        return grounding

    def after_connect(self, state, out, b: int, patch_tokens: torch.Tensor) -> None:
        """Video b of the connector's output `out` was state's; patch_tokens [T, 256, C] its frames'."""
        focus = state.focus
        if focus.phase == "sparse":   # llm: pass 1's visual tokens are ready
            focus.phase = "grounding"
            return
        if focus.mode == "dpe" and focus.dense_positions:
            T = patch_tokens.shape[0]
            with torch.inference_mode():
                state.visual, added = add_keyframes(
                    self.visual.model.connector, state.visual, out.frame_token_offsets[b, :T + 1],
                    out.frame_mask[b, :T], patch_tokens, torch.tensor(focus.dense_positions, device=patch_tokens.device))
            state.tokens.keyframes += added
            state.tokens.visual_tokens = state.visual.shape[0]
        sparse_tokens = self.visual.encoder.count_tokens(len(focus.info.sparse_frames))
        focus.info.extra_visual_tokens = state.tokens.visual_tokens - sparse_tokens

    # -- the hook of the engine ------------------------------------------------------------------------------

    def finish_grounding(self, state) -> bool:
        """Pass 1 of an llm request ended: parse its answer and start the answer's frames. False for any other
        request (its end is the request's end)."""
        focus = state.focus
        if focus is None or focus.phase != "grounding":
            return False
        info = focus.info
        info.grounding_answer = self._grounding_text(state)
        info.pass1_prompt_tokens = state.tokens.prompt_tokens
        info.pass1_generated_tokens = sum(len(seq.output_ids) for seq in state.seqs)
        parse = parse_segments(info.grounding_answer)
        info.status, info.reason = parse.status, parse.reason
        info.fixes = sorted({fix for segment in parse.segments for fix in segment.fixes})
        info.segments = [(s.start, s.end) for s in parse.segments]
        state.seqs, state.detokenizers, state.sent_tokens = [], [], []
        state.params, request = focus.params, focus.request
        if not parse.fell_back:
            request = ask(request, asked(request) + focus_prompt_suffix(parse.segments), instruction=request.text)
        state.request = request
        self._plan(state, self._dense(info.segments, focus.num_source_frames))
        return True

    @staticmethod
    def _grounding_text(state) -> str:
        """Pass 1's answer (its own method so tests can stand in for a trained model's answer)."""
        return state.detokenizers[0].text

    # -- shared ----------------------------------------------------------------------------------------------

    def _dense(self, segments: list, num_frames: int) -> list[int]:
        """Dense frames of the segments: dense_frames split between them (at least one each)."""
        if not segments:
            return []
        count = max(1, self.config.dense_frames // len(segments))
        return [i for segment in segments for i in dense_frame_indices(segment, num_frames, count)]

    def _plan(self, state, dense: list[int]) -> None:
        """The answer's frames: sparse + dense; decode the ones the store lacks by index, or go straight on."""
        focus, visual = state.focus, self.visual
        merged = merge_frame_indices(focus.info.sparse_frames, dense, focus.num_source_frames)
        if visual.model.family == "slowfocus":   # the authors' merged order: a frame both sparse and dense twice
            focus.frame_order = list(merged.frame_indices)
            state.frame_times, state.frequency_rows = merged.positions, (merged.lfreq_ids, merged.hfreq_ids)
        else:
            focus.frame_order = sorted(set(merged.frame_indices))
        position = {index: p for p, index in enumerate(focus.frame_order)}
        focus.info.dense_frames = sorted(set(dense))
        focus.dense_positions = [position[i] for i in focus.info.dense_frames]
        focus.new_frames = list(dict.fromkeys(i for i in focus.frame_order if i not in focus.store_rows))
        state.video_key = None     # the whole-video feature cache holds sparse samplings only
        if focus.new_frames:
            focus.phase, state.stage, state.features = "dense", "decoding", None
            focus.dense_submitted = time.perf_counter()
            state.video_future = visual.loader.submit_future(state.request.video, num_frames=None, fps=None,
                                                             max_frames=None, frame_indices=tuple(focus.new_frames))
            visual.decoding.append(state)
        else:
            self._to_answer(state)
            state.stage = "encoding"
            visual.encoding.append(state)

    def _to_answer(self, state) -> None:
        focus = state.focus
        rows = torch.tensor([focus.store_rows[i] for i in focus.frame_order], device=focus.store.device)
        state.features = focus.store.index_select(0, rows)
        focus.phase = "answer"
