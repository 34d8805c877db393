"""The Python API: `LLM(model=...)` and `LLM.generate(requests, SamplingParams(...))`, vLLM-style (DESIGN.md 8).

One batch: videos decode on a thread pool while finished ones are preprocessed and encoded by the ViT in chunks
across videos; the Q-Former reads each video's question; the connector turns all videos into visual tokens at once;
prompts are packed for one varlen prefill; decode steps run the whole batch and requests finish independently.
A request that fails (unreadable video, prompt over the context) gets its error in its own output; the others
complete. Same input and seed give the same tokens, batched or alone.
"""
from __future__ import annotations

import threading
import time
from typing import Iterator, Optional, Sequence, Union

import torch

from .errors import ConfigError, DynFocusError, RequestError
from .feature_cache import FeatureCache, video_cache_key
from .generation import Generator
from .models.baselines import build_baselines
from .outputs import Request, RequestOutput, StreamChunk, TokenAccounting
from .presets import load_model
from .prompt import render_prompt, tokenize_prompt
from .request_checks import coerce_requests, sampling_params_for
from .sampling import SamplingParams
from .video import VideoLoader, preprocess_frames


class _Stopwatch:
    """Stage timings in ms; on CUDA each stage is synchronised at its end so the time is the stage's own."""

    def __init__(self, device: torch.device):
        self.device, self.ms = device, {}

    def add(self, stage: str, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + (now - start) * 1e3
        return now


MAX_FPS_FRAMES = 3600        # fps sampling never takes more frames than this by default (an hour at 1 fps)
FPS_RESERVED_TOKENS = 256    # context left for the prompt text and the answer when capping fps sampling


class LLM:
    """A DynFocus model ready to answer questions about videos.

    model: a preset ("dynfocus-smol", the embedded default; "dynfocus-7b" with random_weights=True; "tiny") or an
    official checkpoint directory. Frames: num_frames uniform samples (default 16) or fps; fps sampling is capped
    by max_frames, by default at the most frames whose visual tokens fit the context (see _frames_that_fit).
    """

    def __init__(self, model: str = "dynfocus-smol", *, device: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None, num_frames: Optional[int] = 16, fps: Optional[float] = None,
                 max_frames: Optional[int] = None, max_batch_size: int = 8, vit_chunk_size: int = 64,
                 decode_workers: int = 4, video_timeout_s: float = 60.0, video_backend: str = "auto",
                 feature_cache_size: int = 8, sync_interval: int = 8, cluster_backend: str = "auto", seed: int = 0,
                 random_weights: bool = False, vision_tower: Optional[str] = None, visual_encoder: str = "dynfocus"):
        for name, value in (("max_batch_size", max_batch_size), ("vit_chunk_size", vit_chunk_size),
                            ("decode_workers", decode_workers), ("sync_interval", sync_interval)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"LLM {name} = {value!r} is invalid: expected an integer >= 1")
        if feature_cache_size < 0:
            raise ConfigError(f"LLM feature_cache_size = {feature_cache_size!r} is invalid: expected >= 0 (0 disables)")
        self.loaded = load_model(model, device=device, dtype=dtype, cluster_backend=cluster_backend, seed=seed,
                                 random_weights=random_weights, vision_tower=vision_tower)
        self.model = self.loaded.model
        self.device = self.model.llm.model.embed_tokens.weight.device
        self.dtype = self.model.llm.model.embed_tokens.weight.dtype
        self.encoder = self._visual_encoder(visual_encoder)
        # fps sampling of a long video is capped by default at what the context can hold (see _frames_that_fit).
        self.fps_max_frames = max_frames if max_frames is not None else self._frames_that_fit()
        self.sampling = dict(num_frames=None if fps is not None else num_frames, fps=fps,
                             max_frames=self.fps_max_frames if fps is not None else max_frames)
        # Frames are resized to the ViT's input while they decode: memory grows with T x 224^2, not the source size.
        self.loader = VideoLoader(num_workers=decode_workers, backend=video_backend, timeout_s=video_timeout_s,
                                  pin_memory=self.device.type == "cuda", image_size=self.model.config.vit.image_size,
                                  resize_device=str(self.device), **self.sampling)
        self.max_batch_size, self.vit_chunk_size = max_batch_size, vit_chunk_size
        self.features = FeatureCache(feature_cache_size)
        self._video_lock = threading.Lock()
        self.generator = Generator(self.model.llm, self.loaded.tokenizer, self.loaded.eos_token_ids,
                                   sync_interval=sync_interval)

    def _frames_that_fit(self) -> int:
        """The most frames (at most MAX_FPS_FRAMES) whose visual tokens leave FPS_RESERVED_TOKENS of the context for
        the prompt text and the answer: fps sampling stops there unless max_frames says otherwise, so a long video
        is not decoded and encoded in full only to be rejected for its length."""
        if self.encoder is None:
            return MAX_FPS_FRAMES
        count = self.encoder.count_tokens
        budget = self.loaded.context_length - FPS_RESERVED_TOKENS
        low, high = 1, MAX_FPS_FRAMES  # token counts grow with T: the last T that fits, by bisection
        if count(high) <= budget:
            return high
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if count(middle) <= budget else (low, middle - 1)
        return low

    def _visual_encoder(self, name: str):
        """The model's DynFocus connector, or a token-count baseline over its parameters (models/baselines.py)."""
        if name == "dynfocus" or self.model.text_only:
            return None if self.model.text_only else self.model.connector
        encoders = build_baselines(self.model.connector)
        if name not in encoders:
            raise ConfigError(f"visual_encoder {name!r} is unknown: expected 'dynfocus' or one of {sorted(encoders)}")
        return encoders[name]

    @property
    def notice(self) -> Optional[str]:
        """What users must know about the weights (e.g. an untrained visual path), or None."""
        return self.loaded.notice

    def generate(self, requests, sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None, *,
                 progress: bool = False) -> list[RequestOutput]:
        """Answers every request; returns one RequestOutput per request, in order (failures included, see .error)."""
        items = self._as_list(requests)
        outputs: list = [None] * len(items)
        for chunk in self._stream_items(items, sampling_params, progress, replay_streamed=True):
            if chunk.finished:
                outputs[chunk.index] = chunk.output
        return outputs

    def stream(self, requests, sampling_params=None, *, progress: bool = False) -> Iterator[StreamChunk]:
        """Yields StreamChunks (new text per request) as generation goes; each request's last one has its output."""
        return self._stream_items(self._as_list(requests), sampling_params, progress)

    def _stream_items(self, items: list, sampling_params, progress: bool,
                      replay_streamed: bool = False) -> Iterator[StreamChunk]:
        params = self._params_for(sampling_params, len(items))
        bar = _progress_bar(len(items)) if progress else None
        for start in range(0, len(items), self.max_batch_size):
            batch = list(range(start, min(start + self.max_batch_size, len(items))))
            for chunk in self._run_with_fallback(batch, items, params, replay_streamed):
                if bar is not None and chunk.finished:
                    bar.update(1)
                yield chunk
        if bar is not None:
            bar.close()

    # -- batching ------------------------------------------------------------------------------------------------

    @staticmethod
    def _as_list(requests) -> list:
        return coerce_requests(requests)

    @staticmethod
    def _params_for(sampling_params, n: int) -> list:
        return sampling_params_for(sampling_params, n)

    def _fail(self, index: int, item, error: BaseException, timings=None) -> StreamChunk:
        request_id = getattr(item, "request_id", None) or str(index)  # a Request, or the error of a rejected one
        kind = "" if isinstance(error, DynFocusError) else f"internal error ({type(error).__name__}): "
        output = RequestOutput(request_id, error=f"{kind}{error}", timings_ms=dict(timings or {}),
                               notice=self.notice)
        return StreamChunk(index, request_id, "", True, output)

    def _run_with_fallback(self, batch: list, items: list, params: list,
                           replay_streamed: bool = False) -> Iterator[StreamChunk]:
        """Runs a batch; if it breaks, every unfinished request runs again alone, so only the culprit fails. Under
        stream(), a request that already streamed text cannot be replayed and gets the error; generate() shows no
        partial text (replay_streamed), so there every unfinished request is replayed."""
        finished, streamed = set(), set()
        try:
            for chunk in self._run_batch(batch, items, params):
                if chunk.finished:
                    finished.add(chunk.index)
                elif chunk.text and not replay_streamed:
                    streamed.add(chunk.index)
                yield chunk
        except Exception as error:  # noqa: BLE001 - isolate the failure, report it per request
            pending = [i for i in batch if i not in finished]
            for index in pending:
                if index in streamed or len(batch) == 1:
                    yield self._fail(index, items[index], error)
                else:
                    yield from self._run_with_fallback([index], items, params, replay_streamed)

    def _run_batch(self, batch: list, items: list, params: list) -> Iterator[StreamChunk]:
        watch = _Stopwatch(self.device)
        batch_start = time.perf_counter()
        live = []
        for index in batch:
            if isinstance(items[index], Exception):
                yield self._fail(index, items[index], items[index])
            else:
                live.append(index)
        features, failures = self._encode_videos(live, items, watch)
        for index, error in failures.items():
            yield self._fail(index, items[index], error, watch.ms)
        live = [i for i in live if i not in failures]
        if not live:
            return
        visual, accounting = self._connect(live, items, features, watch)
        prompts, failures = self._prompts(live, items, params, visual, accounting)
        for index, error in failures.items():
            yield self._fail(index, items[index], error, watch.ms)
        live = [i for i in live if i not in failures]
        if not live:
            return
        embeds, lengths = self._pack(live, prompts, visual)
        max_new = [min(params[i].max_tokens, self.loaded.context_length - n) for i, n in zip(live, lengths)]
        yield from self._decode(live, items, [params[i] for i in live], embeds, lengths, max_new, accounting, watch,
                                batch_start)

    # -- stages --------------------------------------------------------------------------------------------------

    def _encode_videos(self, live: list, items: list, watch: _Stopwatch) -> tuple[dict, dict]:
        """ViT features [T, 257, C] of every live video request, from the cache or decoded + encoded in chunks."""
        with self._video_lock:  # one batch at a time uses the loader (its results() drains every pending video)
            return self._encode_videos_locked(live, items, watch)

    def _encode_videos_locked(self, live: list, items: list, watch: _Stopwatch) -> tuple[dict, dict]:
        features, failures, owners = {}, {}, {}
        for index in live:
            request = items[index]
            if request.video is None:
                continue
            if self.model.text_only:
                failures[index] = RequestError(f"model {self.loaded.name} is text-only: ask without a video, or "
                                               f"use a DynFocus model such as dynfocus-smol")
                continue
            key = video_cache_key(request.video, *self._sampling_of(request).values())
            cached = self.features.get(key)
            if cached is not None:
                features[index] = cached
                continue
            owners[self.loader.submit(request.video, **self._sampling_of(request))] = (index, key)
        pending: list = []
        start = time.perf_counter()
        for result in self.loader.results(ordered=False):
            start = watch.add("video_decode", start)
            index, key = owners[result.index]
            if not result.ok:
                failures[index] = result.error
                continue
            pending.append((index, key, preprocess_frames(result.frames.frames, image_size=self.model.config.vit.image_size,
                                                          device=self.device, dtype=self.dtype)))
            start = watch.add("preprocess", start)
            if sum(p[2].shape[0] for p in pending) >= self.vit_chunk_size:
                self._flush_vit(pending, features, watch)
                start = time.perf_counter()
        self._flush_vit(pending, features, watch)
        return features, failures

    def _sampling_of(self, request: Request) -> dict:
        if request.num_frames is not None:
            return dict(num_frames=request.num_frames, fps=None, max_frames=None)
        if request.fps is not None:
            return dict(num_frames=None, fps=request.fps, max_frames=self.fps_max_frames)
        return dict(self.sampling)

    def _flush_vit(self, pending: list, features: dict, watch: _Stopwatch) -> None:
        if not pending:
            return
        start = time.perf_counter()
        tokens = self.model.encode_frames(torch.cat([p[2] for p in pending]), chunk_size=self.vit_chunk_size)
        for (index, key, pixels), part in zip(pending, tokens.split([p[2].shape[0] for p in pending])):
            features[index] = part
            if key is not None:  # a copy: a view would keep the whole chunk's features alive in the cache
                self.features.put(key, part.clone())
        pending.clear()
        watch.add("vit", start)

    def _connect(self, live: list, items: list, features: dict, watch: _Stopwatch):
        """Q-Former + connector over every video of the batch -> ({index: visual tokens}, {index: accounting})."""
        videos = [i for i in live if i in features]
        accounting = {i: TokenAccounting() for i in live}
        if not videos:
            return {}, accounting
        start = time.perf_counter()
        frames = [features[i].shape[0] for i in videos]
        frame_tokens = torch.cat([features[i] for i in videos])
        question_ids, question_mask = self.loaded.question_tokenizer([items[i].question for i in videos], self.device)
        counts = torch.tensor(frames, device=self.device)
        frame_question = torch.repeat_interleave(torch.arange(len(videos), device=self.device), counts)
        with torch.inference_mode():
            q_emb = None
            if getattr(self.encoder, "uses_qformer", True):
                q_emb = self.model.qformer(frame_tokens, question_ids, question_mask, frame_question)
                q_emb = q_emb.to(frame_tokens.dtype)
                start = watch.add("qformer", start)
            out = self.encoder(frame_tokens[:, 1:], q_emb, frames, check=False)
        start = watch.add("connector", start)
        keyframes = out.keyframes.ge(0).sum(1).tolist()
        patches = self.model.config.connector.patch_grid ** 2
        visual, offset = {}, 0
        for b, index in enumerate(videos):
            visual[index] = out.tokens[offset:offset + out.num_tokens[b]]
            offset += out.num_tokens[b]
            accounting[index] = TokenAccounting(frames=frames[b], keyframes=keyframes[b],
                                                visual_tokens=out.num_tokens[b], full_visual_tokens=frames[b] * patches)
        return visual, accounting

    def _prompts(self, live, items, params, visual, accounting) -> tuple[dict, dict]:
        prompts, failures = {}, {}
        context = self.loaded.context_length
        for index in live:
            has_video = index in visual
            text = render_prompt(self.loaded.template, items[index].question, has_video, self.loaded.tokenizer)
            parts = tokenize_prompt(self.loaded.tokenizer, text, add_bos=self.loaded.add_bos)
            total = len(parts) + (visual[index].shape[0] if has_video else 0)
            accounting[index].prompt_tokens = total
            if total >= context:
                failures[index] = RequestError(
                    f"the prompt needs {total} tokens ({accounting[index].visual_tokens} visual) but the context holds "
                    f"{context}: use fewer frames (num_frames / fps) or a shorter question")
                continue
            prompts[index] = parts
        return prompts, failures

    def _pack(self, live: list, prompts: dict, visual: dict) -> tuple[torch.Tensor, list]:
        """Packed prompt embeddings [total, hidden]: text embeddings with each video's tokens at its `<image>`."""
        text_ids, text_pos, vis_rows, vis_pos, lengths, offset = [], [], [], [], [], 0
        for index in live:
            parts = prompts[index]
            n_vis = visual[index].shape[0] if index in visual else 0
            n_before, length = len(parts.before), len(parts) + n_vis
            text_ids += parts.before + parts.after
            text_pos.append(torch.cat([torch.arange(offset, offset + n_before),
                                       torch.arange(offset + n_before + n_vis, offset + length)]))
            if n_vis:
                vis_rows.append(visual[index])
                vis_pos.append(torch.arange(offset + n_before, offset + n_before + n_vis))
            lengths.append(length)
            offset += length
        llm = self.model.llm
        embeds = torch.empty(offset, llm.config.hidden_size, device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            embeds[torch.cat(text_pos).to(self.device)] = llm.embed(torch.tensor(text_ids, device=self.device))
            if vis_rows:
                embeds[torch.cat(vis_pos).to(self.device)] = torch.cat(vis_rows).to(self.dtype)
        return embeds, lengths

    def _decode(self, live, items, params, embeds, lengths, max_new, accounting, watch,
                batch_start: float) -> Iterator[StreamChunk]:
        """Prefill + decode; timings: "prefill" (incl. the first token's sampling), "time_to_first_token" (wall
        time from the batch's start), "decode_steps" (from the first token to this request's last)."""
        start = time.perf_counter()
        first = None
        for event in self.generator.run(embeds, lengths, params, max_new):
            if first is None:
                first = time.perf_counter()
                watch.ms["prefill"] = (first - start) * 1e3
                watch.ms["time_to_first_token"] = (first - batch_start) * 1e3
            for row in event.updated:
                index, state = live[row], event.run.states[row]
                request_id = items[index].request_id or str(index)
                delta = event.run.new_text(row)
                if state.finish_reason is None:
                    if delta:
                        yield StreamChunk(index, request_id, delta, False)
                    continue
                tokens = accounting[index]
                tokens.generated_tokens = len(state.token_ids)
                timings = {**watch.ms, "decode_steps": (time.perf_counter() - first) * 1e3}
                output = RequestOutput(request_id, state.text, list(state.token_ids), state.finish_reason, None,
                                       tokens, timings, self.notice)
                yield StreamChunk(index, request_id, delta, True, output)


def _progress_bar(total: int):
    from tqdm import tqdm
    return tqdm(total=total, unit="req", desc="dynfocus", dynamic_ncols=True)
