"""The three Ray Data stages of a corpus job: decode on CPU workers, answer on engine actors, write shards.

Decoding samples the frames exactly as `LLM.generate` does on a path (the same decode_video call and arguments);
the answering actor then hands the engine those frames with num_frames = T, whose uniform sampling of T out of T
frames keeps them all, so a row equals `LLM.generate` on the same request. Between stages the frames travel as
raw bytes plus their shape (uint8 [T, H, W, 3]); every failure becomes that row's error, never the batch's.
A job whose engine decodes (CorpusJob.decode_in_engine: focus, a SlowFocus model) sends the path instead: the
decode stage checks the file (stat only) and the engine reads it, as `LLM.generate` on the path does.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Optional

import numpy as np
import pyarrow as pa

from ..errors import RequestError, VideoDecodeError
from ..outputs import Request
from ..sampling import SamplingParams
from ..video import decode_video
from ..video_decode import video_path_problem
from .errors import CorpusError
from .manifest import INTEGER_FIELDS, OPTIONAL_FIELDS, frame_sampling_for, sampling_for
from .shards import OUTPUT_SCHEMA, TOKEN_FIELDS, write_shard

MANIFEST_SCHEMA = pa.schema([("id", pa.string()), ("video", pa.string()), ("question", pa.string()),
                             *[(name, pa.int64() if name in INTEGER_FIELDS else pa.float64())
                               for name in OPTIONAL_FIELDS]])
DECODED_SCHEMA = pa.schema([*MANIFEST_SCHEMA, ("frames", pa.large_binary()), ("frames_shape", pa.list_(pa.int64())),
                            ("decode_error", pa.string()), ("decode_error_kind", pa.string()),
                            ("decode_ms", pa.float64()), ("decoded_on", pa.string())])
WRITTEN_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.string()), ("ok", pa.bool_()),
                            ("error_kind", pa.string()), ("generated_tokens", pa.int64())])


def error_kind(error: BaseException) -> str:
    if isinstance(error, VideoDecodeError):
        return "video_decode"
    if isinstance(error, RequestError):
        return "request"
    return "internal"


def decode_batch(batch: pa.Table, *, frame_sampling: dict, backend: str, timeout_s: float,
                 in_engine: bool = False) -> pa.Table:
    """Stage 1 (CPU tasks): each row's sampled frames, or its decode error naming the file and the reason.
    in_engine: the engine decodes (focus, SlowFocus): only the file is checked here, and no frames travel."""
    rows = batch.to_pylist()
    for row in rows:
        start = time.perf_counter()
        row.update(frames=None, frames_shape=None, decode_error=None, decode_error_kind=None)
        if in_engine:
            problem = video_path_problem(row["video"])
            if problem is not None:
                row.update(decode_error=f"{row['video']}: {problem}", decode_error_kind="video_decode")
            row.update(decode_ms=(time.perf_counter() - start) * 1e3, decoded_on=process_name())
            continue
        try:
            decoded = decode_video(row["video"], backend=backend, timeout_s=timeout_s,
                                   **frame_sampling_for(row, frame_sampling))
            frames = decoded.frames.numpy()
            row.update(frames=frames.tobytes(), frames_shape=list(frames.shape))
        except Exception as error:  # noqa: BLE001 - one bad video is one error row, never a failed job
            message = str(error)
            if row["video"] not in message:
                message = f"{row['video']}: {message}"
            kind = error_kind(error)
            row.update(decode_error=message if kind != "internal" else f"internal error ({type(error).__name__}): "
                                                                      f"{message}", decode_error_kind=kind)
        row.update(decode_ms=(time.perf_counter() - start) * 1e3, decoded_on=process_name())
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


class Answerer:
    """Stage 2 (an actor per engine, one per GPU, or CPU actors): holds one LLM and answers decoded rows."""

    def __init__(self, model: str, engine_kwargs: dict, sampling: SamplingParams, focus=None,
                 frame_sampling: Optional[dict] = None):
        """focus / frame_sampling: a job whose engine decodes (CorpusJob.decode_in_engine) passes the job's focus
        and frame sampling; rows then arrive without frames and the engine reads their files."""
        from ..engine import LLM  # here, on the actor: the driver never loads a model

        self.llm = LLM(model, **engine_kwargs)
        if self.llm.model.family == "slowfocus" and frame_sampling is None:
            # The driver did not see a SlowFocus model (a folder only the workers have): frames without their times.
            raise CorpusError(f"model {model!r} is a SlowFocus model, but the job sends sampled frames: its "
                              f"temporal embedding needs each frame's time in the source video; give the driver the "
                              f"model folder too, so the job lets the engines read the files")
        self.sampling, self.focus, self.frame_sampling = sampling, focus, frame_sampling

    def _request(self, row: dict) -> Request:
        if self.frame_sampling is None:
            return Request(question=row["question"], video=_frames_of(row), request_id=row["id"],
                           num_frames=row["frames_shape"][0])
        sampling = frame_sampling_for(row, self.frame_sampling)
        if sampling["fps"] is not None and sampling["max_frames"] != self.frame_sampling["max_frames"]:
            raise RequestError(f"max_frames = {sampling['max_frames']} in this row: a job whose engine decodes "
                               f"(focus, or a SlowFocus model) caps fps sampling at the job's max_frames "
                               f"({self.frame_sampling['max_frames']}) for every row")
        return Request(question=row["question"], video=row["video"], request_id=row["id"],
                       num_frames=sampling["num_frames"], fps=sampling["fps"], focus=self.focus)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        requests, refused = [], {}
        for row in rows:
            if row["decode_error"] is None:
                try:
                    requests.append((row, self._request(row)))
                except RequestError as error:
                    refused[row["id"]] = str(error)
        live = [row for row, _ in requests]
        params = [sampling_for(row, self.sampling) for row in live]
        outputs = dict(zip((row["id"] for row in live),
                           self.llm.generate([r for _, r in requests], params) if live else []))
        results = []
        for row in rows:
            output = outputs.get(row["id"])
            result = {"id": row["id"], "video": row["video"], "question": row["question"],
                      "timings_ms": {"corpus_decode": row["decode_ms"]}, "notice": self.llm.notice,
                      "decoded_on": row["decoded_on"], "answered_on": process_name()}
            if output is None:
                error = refused.get(row["id"], row["decode_error"])
                kind = "request" if row["id"] in refused else row["decode_error_kind"]
                result.update(ok=False, text="", token_ids=[], finish_reason="error", error=error, error_kind=kind,
                              focus=None, **{name: 0 for name in TOKEN_FIELDS})
            else:
                result.update(ok=output.ok, text=output.text, token_ids=list(output.token_ids),
                              finish_reason=output.finish_reason, error=output.error, error_kind=output.error_kind,
                              focus=json.dumps(output.focus.to_dict()) if output.focus is not None else None,
                              **{name: getattr(output.tokens, name) for name in TOKEN_FIELDS})
                result["timings_ms"].update(output.timings_ms)
            result["timings_ms"] = list(result["timings_ms"].items())
            results.append(result)
        return pa.Table.from_pylist(results, schema=OUTPUT_SCHEMA)


def write_batch(batch: pa.Table, *, directory: str, fmt: str) -> pa.Table:
    """Stage 3 (CPU tasks): the batch as one atomically written shard; returns a small record per row."""
    name = write_shard(batch, directory, fmt)
    return pa.table({"id": batch.column("id"), "shard": [name] * batch.num_rows, "ok": batch.column("ok"),
                     "error_kind": batch.column("error_kind"),
                     "generated_tokens": batch.column("generated_tokens")}, schema=WRITTEN_SCHEMA)


def _frames_of(row: dict) -> np.ndarray:
    # A writable copy: torch warns on (and must not alias) the read-only buffer Arrow hands out.
    return np.frombuffer(row["frames"], dtype=np.uint8).reshape(row["frames_shape"]).copy()


def process_name() -> str:
    """host:pid of this worker, recorded in each row so a run shows where its rows were decoded and answered."""
    return f"{socket.gethostname()}:{os.getpid()}"
