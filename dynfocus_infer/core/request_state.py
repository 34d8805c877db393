"""Host-side state of one request inside the engine, from arrival to its last output."""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..outputs import Request, TokenAccounting
from ..sampling import SamplingParams
from .detokenizer import IncrementalDetokenizer
from .sequence import Sequence


@dataclass(eq=False)
class RequestState:
    """stage: "queued" (its video waits for a place on the decode pool, visual_stage.admit), "decoding" (video on
    the thread pool), "encoding" (frames ready for the ViT), "ready" (prompt embeddings built, sequences queued or
    running), "finished"."""

    request_id: str
    request: Optional[Request]
    params: SamplingParams
    seed: int
    arrival: float = field(default_factory=time.perf_counter)
    stage: str = "decoding"
    video_key: object = None
    video_future: Optional[Future] = None
    decode_submitted: float = 0.0                     # when its video went to the decode pool
    pixels: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None
    visual: Optional[torch.Tensor] = None
    seqs: list = field(default_factory=list)          # one Sequence per completion (n)
    detokenizers: list = field(default_factory=list)  # one IncrementalDetokenizer per completion
    sent_tokens: list = field(default_factory=list)   # per completion: token ids already reported
    tokens: TokenAccounting = field(default_factory=TokenAccounting)
    timings_ms: dict = field(default_factory=dict)
    error: Optional[str] = None
    finished: bool = False
    aborted: bool = False
    output_id: str = ""                               # the id its outputs carry (the caller's)
    ready_time: Optional[float] = None
    focus: object = None                              # a focus_stage.FocusState when request.focus is set
    frame_times: Optional[tuple] = None               # SlowFocus: each frame's time in [0, 1] (its temporal embedding)
    frequency_rows: Optional[tuple] = None            # SlowFocus: (low, high) frame positions mixed; None: ((0,), (0,))

    @property
    def streams_tokens(self) -> bool:
        """False while a focus request's grounding pass runs: those tokens are the engine's, not the caller's."""
        return self.focus is None or self.focus.phase != "grounding"

    def add_time(self, stage: str, ms: float) -> None:
        self.timings_ms[stage] = self.timings_ms.get(stage, 0.0) + ms

    def completions(self) -> list[tuple[Sequence, IncrementalDetokenizer]]:
        return list(zip(self.seqs, self.detokenizers))
