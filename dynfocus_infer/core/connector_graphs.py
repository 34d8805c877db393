"""CUDA graphs of the DynFocus connector's inference path, one per (videos, frames) bucket (issue 12 item 3).

One connector call is about ten Triton launches and fifty other kernels (bench/count_ops.py); replaying a captured
graph launches them as one. A bucket (B_b, T_b) serves every batch of at most B_b videos of at most T_b frames: the
batch is laid out by connector_parts.bucket_layout into the bucket's static buffers (video b's frames at packed rows
b * T_b + t, one-frame dummy videos after the real ones), so every shape and host constant the forward sees is the
bucket's, and the index tensors are one static int64 buffer refilled by one host-to-device copy per call. Padding
rows keep whatever they held (no kernel reads them into a real video's tokens). The outputs are copied out of the
graph's buffers, because the next replay overwrites them.

Buckets: T_b rounds T_max up to a multiple of max(4, 2^(floor(log2 T_max) - 3)) frames (under 12.5% padding past 32
frames), B_b is the decode graphs' batch bucket (1, 2, 4, 8, then every 16). A bucket's graph is captured the first
time a batch needs it, up to `max_graphs` graphs and `max_static_bytes` of static inputs (not counted in the KV
cache's memory budget); batches past the largest bucket, whose bucket would more than double their frames, past
those caps, or with a different query count or dtype run eagerly; so does every call after a capture fails
(`disabled` says why). The forward is the eager one (DynFocusConnector.forward_layout on the fused Triton
path), so tokens equal an eager call up to fp32 summation order (tile shapes follow T_b, not T_max).

NOT RUN ON A GPU YET: this session had none. The CPU tests run the buckets, layouts, static buffers and copies with
an eager stand-in for capture (`capture=`) against plain connector calls; gpu_session.sh runs the same comparison
with real graphs (tests/test_connector_graphs.py, CUDA only).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..models.connector import ConnectorOutput, DynFocusConnector
from ..models.connector_parts import bucket_layout, bucket_layout_size, offsets_within
from ..models.token_budget import num_keyframes
from .cuda_graphs import batch_buckets


def frame_bucket(num_frames: int) -> int:
    """T_max rounded up to a multiple of max(4, 2^(floor(log2 T_max) - 3))."""
    step = max(4, 1 << max(0, num_frames.bit_length() - 4))
    return -(-num_frames // step) * step


class _Graph:
    """One bucket's static inputs, layout buffer, replay and output."""

    def __init__(self, patch: torch.Tensor, q_emb: torch.Tensor, layout_buffer: torch.Tensor):
        self.patch, self.q_emb, self.layout_buffer = patch, q_emb, layout_buffer
        self.replay: Optional[Callable[[], None]] = None
        self.output: Optional[ConnectorOutput] = None


class ConnectorGraphs:
    def __init__(self, connector: DynFocusConnector, *, max_videos: int = 64, max_frames: int = 512,
                 max_graphs: int = 16, max_static_bytes: int = 2 * 2 ** 30, capture: Optional[Callable] = None):
        """capture(forward) -> (replay, output): records `forward` (default: into a CUDA graph) and returns a function
        that re-runs it on the current buffer contents, and the ConnectorOutput it writes to. max_static_bytes caps
        the static input buffers of all graphs together (the graphs' own intermediates come on top of it)."""
        self.connector, self.max_frames, self.max_graphs = connector, max_frames, max_graphs
        self.max_static_bytes, self.static_bytes = max_static_bytes, 0
        self.batch_buckets = batch_buckets(max_videos)
        self.capture = capture or self._capture_cuda_graph
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.replays = 0                 # calls served by a graph (the rest ran eagerly)
        self.disabled: Optional[str] = None  # why graphs were turned off (a capture failed): every call runs eagerly
        self._pool = None

    def bucket(self, frames: Sequence[int]) -> Optional[tuple[int, int]]:
        """(B_b, T_b) for a batch, or None where it runs eagerly: past the largest bucket, or where the bucket's
        B_b x T_b rows would more than double the batch's frames (plus 32): the spatial merge and the projectors run
        over every row, so one long video among short ones is cheaper eagerly."""
        if len(frames) > self.batch_buckets[-1] or max(frames) > self.max_frames:
            return None
        key = (next(b for b in self.batch_buckets if b >= len(frames)), min(frame_bucket(max(frames)),
                                                                            self.max_frames))
        return key if key[0] * key[1] <= 2 * sum(frames) + 32 else None

    def _capture_cuda_graph(self, forward: Callable[[], ConnectorOutput]):
        forward()                        # warm-up outside the graph: Triton compiles, the allocator grows
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the video loader's threads pin memory while a lazily captured bucket records
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = forward()
        self._pool = graph.pool()
        torch.cuda.synchronize()
        return graph.replay, output

    def _graph(self, key: tuple[int, int], patch_tokens: torch.Tensor, q_emb: torch.Tensor) -> Optional[_Graph]:
        graph = self.graphs.get(key)
        if graph is not None:
            same = graph.q_emb.shape[1:] == q_emb.shape[1:] and graph.patch.dtype == patch_tokens.dtype
            return graph if same else None
        rows = key[0] * key[1]
        size = rows * (patch_tokens[:1].nbytes + q_emb[:1].nbytes)
        if len(self.graphs) >= self.max_graphs or self.static_bytes + size > self.max_static_bytes:
            return None
        device, config = patch_tokens.device, self.connector.config
        graph = _Graph(patch_tokens.new_zeros(rows, *patch_tokens.shape[1:]), q_emb.new_zeros(rows, *q_emb.shape[1:]),
                       torch.zeros(bucket_layout_size(*key, config), dtype=torch.int64, device=device))
        self.static_bytes += size
        return graph

    def __call__(self, patch_tokens: torch.Tensor, q_emb: torch.Tensor, frames_per_video: Sequence[int], *,
                 check: bool = False) -> ConnectorOutput:
        """As DynFocusConnector.forward (check=False: no finiteness check, the caller's own), by graph replay where a
        bucket serves the batch."""
        connector = self.connector
        frames = [int(t) for t in frames_per_video]
        key = self.bucket(frames) if frames and min(frames) >= 1 else None
        if check or key is None or self.disabled or not connector.fused_inference(patch_tokens.device):
            return connector(patch_tokens, q_emb, frames, check=check)
        connector._check_inputs(patch_tokens, q_emb)
        if sum(frames) != patch_tokens.shape[0]:  # the eager call names the mismatch
            return connector(patch_tokens, q_emb, frames, check=check)
        dtype = connector.mm_projector[0].weight.dtype
        patch_tokens, q_emb = patch_tokens.to(dtype), q_emb.to(dtype)
        try:
            graph = self._graph(key, patch_tokens, q_emb)
            if graph is None:
                return connector(patch_tokens, q_emb, frames, check=False)
            layout = bucket_layout(frames, *key, connector.config, patch_tokens.device, into=graph.layout_buffer)
            self._copy_inputs(graph, patch_tokens, q_emb, frames, key[1])
            if graph.output is None:
                def forward(graph=graph, layout=layout):
                    with torch.inference_mode():
                        return connector.forward_layout(graph.patch, graph.q_emb, layout)

                graph.replay, graph.output = self.capture(forward)
                self.graphs[key] = graph
        except Exception as error:  # noqa: BLE001 - a failed capture (or its memory) must not fail the batch
            self.disabled = f"bucket {key}: {type(error).__name__}: {error}"
            self.graphs.pop(key, None)
            return connector(patch_tokens, q_emb, frames, check=False)
        graph.replay()
        self.replays += 1
        return self._copy_outputs(graph.output, frames)

    @staticmethod
    def _copy_inputs(graph: _Graph, patch_tokens: torch.Tensor, q_emb: torch.Tensor, frames: list[int],
                     bucket_frames: int) -> None:
        """Video b's frames to static rows b * T_b .. b * T_b + T_b - 1: one copy, or one index copy when ragged."""
        if all(t == bucket_frames for t in frames):
            graph.patch[:len(frames) * bucket_frames].copy_(patch_tokens)
            graph.q_emb[:len(frames) * bucket_frames].copy_(q_emb)
            return
        video, time = offsets_within(np.asarray(frames))
        rows = torch.from_numpy(video * bucket_frames + time)
        if patch_tokens.device.type == "cuda":
            rows = rows.pin_memory().to(patch_tokens.device, non_blocking=True)
        graph.patch.index_copy_(0, rows, patch_tokens)
        graph.q_emb.index_copy_(0, rows, q_emb)

    def _copy_outputs(self, out: ConnectorOutput, frames: list[int]) -> ConnectorOutput:
        """The real videos' part of the bucket's output, copied out of the graph's buffers."""
        config = self.connector.config
        num_tokens = tuple(self.connector.count_tokens(t) for t in frames)
        B, T = len(frames), max(frames)
        L = min(T, config.num_events)
        K = max(num_keyframes(t, config) for t in frames)
        return ConnectorOutput(out.tokens[:sum(num_tokens)].clone(), num_tokens, out.token_offsets[:B + 1].clone(),
                               out.frame_token_offsets[:B, :T + 1].clone(), out.keyframes[:B, :K].clone(),
                               out.frame_mask[:B, :T].clone(), out.scores[:B, :L].clone(),
                               out.event_centres[:B, :L].clone(), None)
