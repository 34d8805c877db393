"""From a request to prompt embeddings: video decoding on a thread pool, preprocessing, the ViT over many videos'
frames at once, the Q-Former and connector, and the prompt with the visual tokens spliced in at `<image>`.

The engine calls `poll` every step: it takes the videos whose decoding finished, and encodes at most
`frames_per_step` frames' worth of them (at least one video), so running requests keep decoding while new videos
are encoded. A batch that raises is encoded again one video at a time, so only the culprit fails.

Memory stays bounded however many requests arrive: at most `max_videos_in_flight` videos are decoding or decoded
and waiting for the ViT; the rest wait in `queued`, holding nothing but the request. Requests on the same video
(same file, same sampling) coalesce: while one of them is decoded and encoded, the others wait, then take its ViT
features from the feature cache (with the cache off, feature_cache_size=0, each decodes its own).
"""
from __future__ import annotations

import concurrent.futures
import time

import torch

from ..errors import NonFiniteError, RequestError
from ..feature_cache import FeatureCache, video_cache_key
from ..outputs import TokenAccounting
from ..prompt import IMAGE_PLACEHOLDER, PromptParts, render_prompt, tokenize_prompt
from ..video import VideoLoader, preprocess_frames
from .focus_stage import FocusConfig, FocusStage
from .request_state import RequestState


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class VisualStage:
    def __init__(self, loaded, encoder, loader: VideoLoader, features: FeatureCache, sampling: dict,
                 fps_max_frames: int, frames_per_step: int, vit_chunk_size: int,
                 focus_config: FocusConfig | None = None, max_videos_in_flight: int = 16):
        self.loaded, self.model, self.encoder = loaded, loaded.model, encoder
        self.loader, self.features, self.sampling = loader, features, sampling
        self.fps_max_frames, self.frames_per_step, self.vit_chunk_size = fps_max_frames, frames_per_step, vit_chunk_size
        self.max_videos_in_flight = max_videos_in_flight
        self.device = self.model.llm.model.embed_tokens.weight.device
        self.dtype = self.model.llm.model.embed_tokens.weight.dtype
        self.queued: list[RequestState] = []       # a video to decode, not started yet (admit)
        self.decoding: list[RequestState] = []     # video on the thread pool
        self.encoding: list[RequestState] = []     # features or frames ready, waiting for the ViT / connector
        self.focus = FocusStage(self, focus_config)  # focus requests' extra phases (focus_stage.py)
        self.connector_graphs = None                 # connector_graphs.ConnectorGraphs for the model's connector

    def sampling_of(self, request) -> dict:
        if request.num_frames is not None:
            return dict(num_frames=request.num_frames, fps=None, max_frames=None)
        if request.fps is not None:
            return dict(num_frames=None, fps=request.fps, max_frames=self.fps_max_frames)
        return dict(self.sampling)

    def submit(self, state: RequestState) -> None:
        """Queue a request's video (admit starts it), or a text-only request straight to encoding."""
        request = state.request
        if request.video is None:
            state.stage = "encoding"
            self.encoding.append(state)
            return
        if self.model.text_only:
            raise RequestError(f"model {self.loaded.name} is text-only: ask without a video, or use a DynFocus "
                               f"model such as dynfocus-smol")
        if request.focus is not None:
            self.focus.begin(state)
        state.video_key = video_cache_key(request.video, *self.sampling_of(request).values())
        state.stage = "queued"
        self.queued.append(state)  # started by the next step's poll (admit)

    def admit(self) -> None:
        """Start queued requests in arrival order: from the feature cache when it holds their video (a focus request
        needs its sparse frames' stream indices, which the cache does not keep, so it always decodes), else by
        decoding, while fewer than max_videos_in_flight videos are decoding or waiting for the ViT. A request whose
        video is already being decoded or encoded for another request waits for that one's features."""
        in_flight = {s.video_key for s in self.decoding + self.encoding if s.video_key is not None}
        for state in list(self.queued):
            key = state.video_key
            if state.focus is None and key in self.features:
                self.queued.remove(state)
                state.features, state.stage = self.features.get(key), "encoding"
                state.frame_times = self.features.frame_times(key)
                self.encoding.append(state)
                continue
            if key is not None and key in in_flight and self.features.capacity:
                continue
            if len(self.decoding) + len(self.encoding) >= self.max_videos_in_flight:
                break
            self.queued.remove(state)
            if state.focus is None:
                self.features.count_miss(key)
            state.add_time("video_queue", (time.perf_counter() - state.arrival) * 1e3)
            state.decode_submitted = time.perf_counter()
            state.video_future = self.loader.submit_future(state.request.video, **self.sampling_of(state.request))
            state.stage = "decoding"
            self.decoding.append(state)
            if key is not None:
                in_flight.add(key)

    def drop(self, state: RequestState) -> None:
        for queue in (self.queued, self.decoding, self.encoding):
            if state in queue:
                queue.remove(state)
        if state.video_future is not None:
            state.video_future.cancel()

    @property
    def busy(self) -> bool:
        return bool(self.queued or self.decoding or self.encoding)

    @property
    def in_progress(self) -> int:
        """Requests whose visual tokens are not ready yet (queued, decoding or waiting for the ViT)."""
        return len(self.queued) + len(self.decoding) + len(self.encoding)

    def wait_for_video(self, timeout_s: float = 0.05) -> None:
        """Block briefly until a decode finishes: called when the model has nothing else to do."""
        futures = [s.video_future for s in self.decoding]
        if futures and not self.encoding:
            concurrent.futures.wait(futures, timeout=timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)

    def poll(self) -> tuple[list[RequestState], dict]:
        """(requests whose visual tokens are ready this step, {request: error} for those that failed)."""
        failures = {}
        self.admit()
        now = time.perf_counter()
        for state in [s for s in self.decoding if s.video_future.done()]:
            self.decoding.remove(state)
            result = state.video_future.result()
            state.add_time("video_decode", (now - self.focus.decode_start(state)) * 1e3)
            if not result.ok:
                failures[state] = result.error
                continue
            if state.focus is not None:
                self.focus.on_decoded(state, result.frames)
            if self.model.family == "slowfocus" and (state.focus is None or state.focus.phase == "sparse"):
                decoded = result.frames   # dense frames' times come from the focus plan (focus_stage._plan)
                state.frame_times = tuple((decoded.frame_indices.double() / decoded.num_source_frames).tolist())
            start = time.perf_counter()
            try:
                state.pixels = preprocess_frames(result.frames.frames, image_size=self.model.config.vit.image_size,
                                                 device=self.device, dtype=self.dtype)
            except Exception as error:  # noqa: BLE001 - this video's failure alone
                failures[state] = error
                continue
            _sync(self.device)
            state.add_time("preprocess", (time.perf_counter() - start) * 1e3)
            state.stage = "encoding"
            self.encoding.append(state)
        batch, frames = [], 0
        while self.encoding and (not batch or frames < self.frames_per_step):
            state = self.encoding.pop(0)
            batch.append(state)
            frames += 0 if state.pixels is None else state.pixels.shape[0]
        done = self._encode_isolated(batch, failures)
        self.admit()  # the encoded videos' places, and their features for requests waiting on the same video
        return done, failures

    def _encode_isolated(self, batch: list, failures: dict) -> list:
        try:
            non_finite = self._encode(batch)
            for state in non_finite:
                failures[state] = NonFiniteError(
                    f"video {_describe(state.request.video)}: its frame features hold NaN or inf (the ViT's output "
                    f"overflowed, or frames given in memory hold non-finite values), so its visual tokens "
                    f"would be meaningless; the request is failed instead")
            # A focus request that went back to a queue (its dense frames) is not ready yet.
            return [state for state in batch if state not in non_finite and state not in self.decoding
                    and state not in self.encoding]
        except Exception as error:  # noqa: BLE001 - find the culprit: encode each video alone
            if len(batch) == 1:
                failures[batch[0]] = error
                return []
            done = []
            for state in batch:
                done += self._encode_isolated([state], failures)
            return done

    def _encode(self, batch: list[RequestState]) -> list[RequestState]:
        """ViT (for videos not cached) + connector; returns the videos whose features are not finite (failed)."""
        fresh = [s for s in batch if s.pixels is not None and s.features is None]
        if fresh:
            start = time.perf_counter()
            tokens = self.model.encode_frames(torch.cat([s.pixels for s in fresh]), chunk_size=self.vit_chunk_size)
            for state, part in zip(fresh, tokens.split([s.pixels.shape[0] for s in fresh])):
                state.features, state.pixels = part, None
                # A clone: a view would keep the whole chunk alive.
                self.features.put(state.video_key, part.clone(), state.frame_times)
                if state.focus is not None:
                    self.focus.on_encoded(state, part.clone())
            _sync(self.device)
            elapsed = (time.perf_counter() - start) * 1e3
            for state in fresh:
                state.add_time("vit", elapsed)
        grounding = self.focus.take_grounding(batch)
        return self._connect([s for s in batch if s.features is not None and s not in grounding])

    def _connect(self, videos: list[RequestState]) -> list[RequestState]:
        """Q-Former + connector over every video of the batch -> each request's visual tokens and accounting; returns
        the videos whose frame features hold NaN or inf. The DPC-KNN kernels run unchecked here (check=False: no host
        sync per op), and a NaN would read as distance 0 to every frame, so the check is made once, on the device,
        and read back with the keyframe counts (the one sync this stage makes anyway)."""
        if not videos:
            return []
        if self.model.family == "slowfocus":
            return self._connect_slowfocus(videos)
        start = time.perf_counter()
        frames = [s.features.shape[0] for s in videos]
        frame_tokens = torch.cat([s.features for s in videos])
        question_ids, question_mask = self.loaded.question_tokenizer([s.request.text for s in videos], self.device)
        counts = torch.tensor(frames, device=self.device)
        frame_question = torch.repeat_interleave(torch.arange(len(videos), device=self.device), counts)
        with torch.inference_mode():
            q_emb = None
            if getattr(self.encoder, "uses_qformer", True):
                q_emb = self.model.qformer(frame_tokens, question_ids, question_mask, frame_question)
                q_emb = q_emb.to(frame_tokens.dtype)
                _sync(self.device)
                now = time.perf_counter()
                for state in videos:
                    state.add_time("qformer", (now - start) * 1e3)
                start = now
            uses_graphs = self.connector_graphs is not None and self.encoder is self.model.connector
            out = (self.connector_graphs if uses_graphs else self.encoder)(frame_tokens[:, 1:], q_emb, frames,
                                                                           check=False)
        _sync(self.device)
        elapsed = (time.perf_counter() - start) * 1e3
        frame_finite = torch.isfinite(frame_tokens).flatten(1).all(1)
        video_non_finite = torch.zeros(len(videos), dtype=torch.int64, device=self.device).index_add_(
            0, frame_question, (~frame_finite).to(torch.int64))
        readback = torch.stack([out.keyframes.ge(0).sum(1).to(torch.int64), video_non_finite]).tolist()
        keyframes, non_finite = readback[0], readback[1]
        patches = self.model.config.connector.patch_grid ** 2
        offset = frame_start = 0
        for b, state in enumerate(videos):
            state.visual = out.tokens[offset:offset + out.num_tokens[b]]
            offset += out.num_tokens[b]
            state.features = None
            state.add_time("connector", elapsed)
            state.tokens = TokenAccounting(frames=frames[b], keyframes=keyframes[b], visual_tokens=out.num_tokens[b],
                                           full_visual_tokens=frames[b] * patches)
            if state.focus is not None:
                self.focus.after_connect(state, out, b, frame_tokens[frame_start:frame_start + frames[b], 1:])
            frame_start += frames[b]
        return [state for state, bad in zip(videos, non_finite) if bad]

    def _connect_slowfocus(self, videos: list[RequestState]) -> list[RequestState]:
        """SlowFocus's tokens for every video of the batch at once: the Q-Former over all their frames (each frame
        reads its video's question), then connector.forward_ragged (a context token and the grid-pooled, temporally
        embedded tokens per frame, mixed between each video's low / high-frequency frames). Returns the videos whose
        features hold NaN or inf, read back in the stage's one sync."""
        model, device = self.model, self.device
        start = time.perf_counter()
        frames = [s.features.shape[0] for s in videos]
        features = torch.cat([s.features for s in videos])
        question_ids, question_mask = self.loaded.question_tokenizer([s.request.text for s in videos], device)
        frame_question = torch.repeat_interleave(torch.arange(len(videos), device=device),
                                                 torch.tensor(frames, device=device))
        times = _on_device(torch.tensor([t for s in videos for t in s.frame_times], dtype=torch.float64), device)
        low, high = (_on_device(rows, device) for rows in
                     _frequency_rows([s.frequency_rows or ((0,), (0,)) for s in videos], frames))
        with torch.inference_mode():
            text_q = model.qformer(model.connector.qformer_input(features), question_ids, question_mask,
                                   frame_question)
            tokens = model.connector.forward_ragged(features, text_q, times, low, high)
        frame_finite = torch.isfinite(features).flatten(1).all(1)
        non_finite = torch.zeros(len(videos), dtype=torch.int64, device=device).index_add_(
            0, frame_question, (~frame_finite).to(torch.int64)).tolist()
        elapsed = (time.perf_counter() - start) * 1e3
        patches = model.config.connector.patch_grid ** 2
        frame_start = 0
        for b, state in enumerate(videos):
            state.visual = tokens[frame_start:frame_start + frames[b]].flatten(0, 1)
            frame_start += frames[b]
            state.features = None
            state.add_time("connector", elapsed)
            state.tokens = TokenAccounting(frames=frames[b], keyframes=0, visual_tokens=state.visual.shape[0],
                                           full_visual_tokens=frames[b] * patches)
            if state.focus is not None:
                self.focus.after_connect(state, None, b, None)   # llm's phases only: dpe is refused for SlowFocus
        return [state for state, bad in zip(videos, non_finite) if bad]

    def prompt(self, state: RequestState, context: int) -> tuple[torch.Tensor, list]:
        """Prompt embeddings [P, hidden] with the visual tokens at `<image>`, and the prompt's token ids (-1 at
        visual rows). A prompt that leaves no room to answer in the context is a RequestError."""
        request, has_video = state.request, state.visual is not None
        if request.prompt is not None:  # vLLM style: the text as given, no template
            pieces = request.prompt.split(IMAGE_PLACEHOLDER)
            before = self.loaded.tokenizer(pieces[0], add_special_tokens=False)["input_ids"]
            after = self.loaded.tokenizer(pieces[1], add_special_tokens=False)["input_ids"] if len(pieces) == 2 else []
            bos = getattr(self.loaded.tokenizer, "bos_token_id", None)
            parts = PromptParts(([bos] if self.loaded.add_bos and bos is not None else []) + list(before),
                                list(after), len(pieces) == 2)
        else:
            text = render_prompt(self.loaded.template, request.question, has_video, self.loaded.tokenizer)
            parts = tokenize_prompt(self.loaded.tokenizer, text, add_bos=self.loaded.add_bos)
        n_vis = state.visual.shape[0] if has_video else 0
        total = len(parts) + n_vis
        state.tokens.prompt_tokens = total
        if total >= context:
            raise RequestError(f"the prompt needs {total} tokens ({state.tokens.visual_tokens} visual) but the context "
                               f"holds {context}: use fewer frames (num_frames / fps) or a shorter question")
        llm = self.model.llm
        with torch.inference_mode():
            pieces = [llm.embed(torch.tensor(parts.before, dtype=torch.int64, device=self.device))]
            if has_video:
                pieces.append(state.visual.to(self.dtype))
            if parts.after:
                pieces.append(llm.embed(torch.tensor(parts.after, dtype=torch.int64, device=self.device)))
            embeds = torch.cat(pieces).to(self.dtype)
        state.visual = None
        return embeds, list(parts.before) + [-1] * n_vis + list(parts.after)


def _on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device`; on CUDA through pinned memory, so the copy does not wait for the device."""
    return host if device.type != "cuda" else host.pin_memory().to(device, non_blocking=True)


def _frequency_rows(lists: list, frames: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Each video's (low, high) frame positions as rows of the batch's concatenated frames, padded with -1:
    [B, Lmax], [B, Hmax] (mixing_attention.mix_frequencies_ragged)."""
    offsets, rows = [0], ([], [])
    for count in frames[:-1]:
        offsets.append(offsets[-1] + count)
    for (low, high), offset in zip(lists, offsets):
        rows[0].append([offset + i for i in low])
        rows[1].append([offset + i for i in high])
    padded = []
    for side in rows:
        width = max(len(r) for r in side)
        padded.append(torch.tensor([r + [-1] * (width - len(r)) for r in side], dtype=torch.int64))
    return padded[0], padded[1]


def _describe(video) -> str:
    """A video as messages name it: its path, or the shape of frames given in memory."""
    return repr(video) if isinstance(video, str) else f"of {tuple(getattr(video, 'shape', ()))} frames in memory"
