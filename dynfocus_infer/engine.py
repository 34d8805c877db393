"""The Python API in vLLM's shape (DESIGN.md 8, 10): `LLM(model=...)`, `LLM.generate(requests, SamplingParams(...))`,
`LLM.stream(...)` and `LLM.chat(messages, ...)`, all running on the continuous-batching engine (core/llm_engine.py).

Requests are admitted into free KV capacity at every step; videos decode on a thread pool and are encoded a budget
per step while running requests keep decoding. A request that fails (unreadable video, prompt over the context)
gets its error in its own output; the others complete. Same input and seed give the same tokens, batched or alone.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
from collections import deque
from typing import Iterator, Optional, Sequence, Union

import torch

from .chat import conversation_request
from .core.focus_stage import FocusConfig
from .core.kv_budget import CacheConfig
from .core.llm_engine import LLMEngine
from .core.visual_stage import VisualStage
from .errors import ConfigError, RequestError
from .feature_cache import FeatureCache
from .models.baselines import encoder_by_name
from .outputs import Request, RequestOutput, StreamChunk
from .presets import load_model
from .request_checks import coerce_requests, sampling_params_for
from .sampling import SamplingParams
from .video import VideoLoader

MAX_FPS_FRAMES = 3600        # fps sampling never takes more frames than this by default (an hour at 1 fps)
FPS_RESERVED_TOKENS = 256    # context left for the prompt text and the answer when capping fps sampling


class LLM:
    """A DynFocus model ready to answer questions about videos.

    model: a preset ("dynfocus-smol", the embedded default; "dynfocus-7b" with random_weights=True; "tiny") or an
    official checkpoint directory. Frames: num_frames uniform samples (default: the model's, 12 for dynfocus-smol as
    it was trained, else 16) or fps; fps sampling is capped
    by max_frames, by default at the most frames whose visual tokens fit the context (see _frames_that_fit).
    """

    def __init__(self, model: str = "dynfocus-smol", *, device: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None, num_frames: Optional[int] = None, fps: Optional[float] = None,
                 max_frames: Optional[int] = None, max_batch_size: Optional[int] = None, vit_chunk_size: int = 64,
                 decode_workers: int = 4, video_timeout_s: float = 60.0, video_backend: str = "auto",
                 feature_cache_size: int = 8, sync_interval: int = 1, cluster_backend: str = "auto", seed: int = 0,
                 random_weights: bool = False, vision_tower: Optional[str] = None, visual_encoder: str = "dynfocus",
                 max_num_seqs: int = 64, max_model_len: Optional[int] = None,
                 max_num_batched_tokens: Optional[int] = None, gpu_memory_utilization: float = 0.9,
                 kv_cache_memory: Optional[int] = None, block_size: Optional[int] = None,
                 max_encode_frames_per_step: Optional[int] = None, enforce_eager: bool = False,
                 async_output: Optional[bool] = None, focus_config: Union[FocusConfig, dict, None] = None,
                 max_videos_in_flight: Optional[int] = None, enable_prefix_caching: bool = True):
        """Engine capacity (vLLM's names): max_num_seqs sequences at once (max_batch_size is its old name),
        max_model_len tokens each (default: the model's context), max_num_batched_tokens rows per step; the KV
        cache is sized once from gpu_memory_utilization (CUDA) or kv_cache_memory bytes (default 1 GiB on CPU).
        max_encode_frames_per_step (default vit_chunk_size): ViT work per step while others decode.
        enforce_eager: no CUDA graphs (on CUDA, decode steps replay graphs captured per batch bucket by default, and
        the DynFocus connector graphs per (videos, frames) bucket: core/connector_graphs.py).
        async_output: bring each step's tokens back while the next step runs (default on CUDA; see LLMEngine).
        sync_interval is kept for compatibility: every step now reads its tokens back (continuous batching).
        focus_config: the knobs of requests with focus= (a FocusConfig or a dict of its fields; DESIGN.md 13).
        max_videos_in_flight (default 4 x decode_workers): videos decoding or decoded and waiting for the ViT at
        once; further requests wait without holding frames, so memory does not grow with the number of requests.
        Requests on the same video share one decode and one ViT pass (through the feature cache).
        enable_prefix_caching: a prompt reuses the K/V of the full KV blocks another prompt already computed (the
        same text and visual tokens from the start: several questions on one video with a question-independent
        encoder, or n > 1 samples), instead of computing them again (core/block_manager.py)."""
        max_num_seqs = max_batch_size if max_batch_size is not None else max_num_seqs
        if isinstance(focus_config, dict):
            focus_config = FocusConfig(**focus_config)
        if max_videos_in_flight is None and isinstance(decode_workers, int):
            max_videos_in_flight = 4 * decode_workers
        for name, value in (("max_num_seqs", max_num_seqs), ("vit_chunk_size", vit_chunk_size),
                            ("decode_workers", decode_workers), ("sync_interval", sync_interval),
                            ("max_videos_in_flight", max_videos_in_flight)):
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
        if num_frames is None and fps is None:
            num_frames = self.loaded.default_frames
        self.sampling = dict(num_frames=None if fps is not None else num_frames, fps=fps,
                             max_frames=self.fps_max_frames if fps is not None else max_frames)
        # Frames are resized to the ViT's input while they decode: memory grows with T x 224^2, not the source size.
        self.loader = VideoLoader(num_workers=decode_workers, backend=video_backend, timeout_s=video_timeout_s,
                                  pin_memory=self.device.type == "cuda", image_size=self.model.config.vit.image_size,
                                  resize_device=str(self.device), **self.sampling)
        self.max_batch_size, self.vit_chunk_size = max_num_seqs, vit_chunk_size
        self.features = FeatureCache(feature_cache_size)
        self.visual = VisualStage(self.loaded, self.encoder, self.loader, self.features, self.sampling,
                                  self.fps_max_frames, max_encode_frames_per_step or vit_chunk_size, vit_chunk_size,
                                  focus_config, max_videos_in_flight)
        if (self.device.type == "cuda" and not enforce_eager and self.encoder is self.model.connector
                and self.model.family == "dynfocus"):
            from .core.connector_graphs import ConnectorGraphs  # the connector replays per (videos, frames) bucket

            self.visual.connector_graphs = ConnectorGraphs(self.encoder, max_videos=max_num_seqs)
        cache_config = CacheConfig(block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
                                   kv_cache_memory=kv_cache_memory, max_model_len=max_model_len,
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   enable_prefix_caching=enable_prefix_caching)
        self.engine = LLMEngine(self.loaded, self.visual, cache_config, self.notice, enforce_eager=enforce_eager,
                                async_output=async_output)
        self._lock = threading.Lock()               # one caller steps the engine at a time
        self._owners: dict[str, deque] = {}          # engine request id -> the queue of the call that owns it
        self._ids = itertools.count()

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
        """The model's DynFocus connector, or a token-count baseline over its parameters (models/baselines.py).
        A SlowFocus model has its own tokens ("dynfocus", the default, names the model's own encoder there)."""
        if name == "dynfocus" or self.model.text_only:
            return None if self.model.text_only else self.model.connector
        if self.model.family != "dynfocus":
            raise ConfigError(f"visual_encoder {name!r}: the token-count baselines run on a DynFocus model's "
                              f"parameters; {self.loaded.name} is a {self.model.family} model with its own tokens "
                              f"(leave visual_encoder at its default)")
        return encoder_by_name(self.model.connector, name)

    @property
    def notice(self) -> Optional[str]:
        """What users must know about the weights (e.g. an untrained visual path), or None."""
        return self.loaded.notice

    def generate(self, requests, sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None, *,
                 progress: bool = False) -> list[RequestOutput]:
        """Answers every request; returns one RequestOutput per request, in order (failures included, see .error).
        A request: a question string, a Request, {"question": ..., "video": ...} or vLLM's
        {"prompt": ..., "multi_modal_data": {"video": path or frames}}."""
        items = self._as_list(requests)
        outputs: list = [None] * len(items)
        for chunk in self._stream_items(items, sampling_params, progress):
            if chunk.finished:
                outputs[chunk.index] = chunk.output
        return outputs

    def stream(self, requests, sampling_params=None, *, progress: bool = False) -> Iterator[StreamChunk]:
        """Yields a StreamChunk whenever a request's text grows (every token that completes text); each request's
        last chunk has finished=True and its RequestOutput."""
        return self._stream_items(self._as_list(requests), sampling_params, progress)

    def chat(self, messages, sampling_params=None, *, focus: Optional[str] = None,
             progress: bool = False) -> list[RequestOutput]:
        """OpenAI-style conversations: a list of {"role", "content"} messages (or a list of such lists), content a
        string or parts {"type": "text", "text": ...} / {"type": "video", "video": path or frames} /
        {"type": "video_url", "video_url": {"url": path or file:// URL}}. The model's chat template is applied.
        focus: "llm" / "dpe" for every conversation (its question: the last user message's text)."""
        conversations = messages if messages and isinstance(messages[0], (list, tuple)) else [messages]
        items = []
        for conversation in conversations:
            try:
                request = conversation_request(conversation, self.loaded.template, self.loaded.tokenizer)
                items.append(request if focus is None else dataclasses.replace(request, focus=focus))
            except RequestError as error:
                items.append(error)
        outputs: list = [None] * len(items)
        for chunk in self._stream_items(items, sampling_params, progress):
            if chunk.finished:
                outputs[chunk.index] = chunk.output
        return outputs

    def _stream_items(self, items: list, sampling_params, progress: bool) -> Iterator[StreamChunk]:
        params = self._params_for(sampling_params, len(items))
        bar = _progress_bar(len(items)) if progress else None
        call = next(self._ids)
        queue: deque = deque()
        index_of, pending = {}, set()
        with self._lock:
            for index, item in enumerate(items):
                request_id = f"{call}-{index}"
                index_of[request_id] = index
                if isinstance(item, Exception):
                    given = getattr(item, "request_id", None)
                    queue.append((request_id, RequestOutput(given or str(index), error=str(item),
                                                            notice=self.notice)))
                    continue
                output_id = item.request_id or str(index)
                self._owners[request_id] = queue
                pending.add(request_id)
                self.engine.add_request(request_id, item, params[index], output_id=output_id)
        try:
            while True:
                while queue:
                    request_id, output = queue.popleft()
                    index = index_of[request_id]
                    yield from self._chunks(index, output)
                    if output.finished:
                        pending.discard(request_id)
                        if bar is not None:
                            bar.update(1)
                if not pending:
                    break
                self._step_once()
        finally:
            with self._lock:
                for request_id in pending:  # a stream closed early: its requests stop and free their KV
                    self.engine.abort(request_id)
                    self._owners.pop(request_id, None)
            if bar is not None:
                bar.close()

    def _step_once(self) -> None:
        with self._lock:
            for request_id, output in self.engine.step_with_ids():
                owner = self._owners.get(request_id)
                if owner is not None:
                    owner.append((request_id, output))
                    if output.finished:
                        del self._owners[request_id]

    def _sampling_of(self, request: Request) -> dict:
        """The frame sampling a request gets (its own num_frames / fps, else the engine's)."""
        return self.visual.sampling_of(request)

    @staticmethod
    def _chunks(index: int, output: RequestOutput) -> Iterator[StreamChunk]:
        for completion in output.outputs[1:]:
            if completion.delta_text:
                yield StreamChunk(index, output.request_id, completion.delta_text, False, None, completion.index)
        head = output.outputs[0]
        if output.finished:
            yield StreamChunk(index, output.request_id, head.delta_text, True, output)
        elif head.delta_text:
            yield StreamChunk(index, output.request_id, head.delta_text, False)

    # -- requests ------------------------------------------------------------------------------------------------

    @staticmethod
    def _as_list(requests) -> list:
        return coerce_requests(requests)

    @staticmethod
    def _params_for(sampling_params, n: int) -> list:
        return sampling_params_for(sampling_params, n)


def _progress_bar(total: int):
    from tqdm import tqdm
    return tqdm(total=total, unit="req", desc="dynfocus", dynamic_ncols=True)
