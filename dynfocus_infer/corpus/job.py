"""What a corpus job answers with (model, sampling, output format), and the output folder's state on disk.

The folder records the job's settings in `_corpus.json` when it is first used; `--resume` refuses a folder whose
rows were answered with other settings, since one folder must not mix answers of two models or samplings.
Names starting with `_` or `.` are skipped by Arrow and Ray Data readers, so the folder reads as a dataset.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError, RequestError
from ..outputs import FOCUS_MODES
from ..sampling import SamplingParams
from ..video_decode import SamplingSpec
from .errors import CorpusError
from .shards import check_format, list_shards, remove_temp_files, written_ids

SETTINGS_FILE, SUMMARY_FILE = "_corpus.json", "_summary.json"
# Engine knobs that change how fast rows come, not what they hold: a resumed run may change them.
SPEED_ONLY_ENGINE_KWARGS = ("max_batch_size", "vit_chunk_size", "decode_workers", "feature_cache_size",
                            "sync_interval", "max_videos_in_flight")


@dataclass
class CorpusJob:
    """model / engine_kwargs: what each answering actor builds (`LLM(model, **engine_kwargs)`).
    num_frames, or fps with max_frames: the job's frame sampling (a row's own fields override it); fps needs an
    explicit max_frames here, because frames are sampled on CPU workers that never load the model whose context
    sets the engine's default cap. focus: None, "llm" or "dpe" for every row (DESIGN.md section 13).

    Frames are decoded on CPU workers and travel to the engines, except where the engine must read the file itself
    (`decode_in_engine`): a focus job (its dense frames are read by index from the file) and a SlowFocus model
    (its temporal embedding needs each frame's time in the source video). The workers then only check each file."""

    model: str = "dynfocus-smol"
    engine_kwargs: dict = field(default_factory=dict)
    num_frames: Optional[int] = None
    fps: Optional[float] = None
    max_frames: Optional[int] = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    output_format: str = "parquet"
    video_backend: str = "auto"
    video_timeout_s: float = 60.0
    focus: Optional[str] = None

    def __post_init__(self):
        check_format(self.output_format)
        if self.focus is not None and self.focus not in FOCUS_MODES:
            raise ConfigError(f"corpus focus = {self.focus!r} is invalid: expected None, 'llm' or 'dpe'")
        if self.focus == "dpe":   # refused now, not in every row after the engines load
            from ..presets import SLOWFOCUS_MODELS, is_slowfocus_directory

            encoder = self.engine_kwargs.get("visual_encoder", "dynfocus")
            if self.model in SLOWFOCUS_MODELS or is_slowfocus_directory(self.model) or encoder != "dynfocus":
                raise ConfigError(f"corpus focus = 'dpe' needs a DynFocus model with its own connector (its events "
                                  f"choose the segment), not model {self.model!r} with visual_encoder {encoder!r}: "
                                  f"use focus = 'llm'")
        if self.fps is not None and self.max_frames is None:
            raise CorpusError("a corpus job with fps sampling needs max_frames (--max-frames): frames are sampled "
                              "on CPU workers before any engine is loaded, so the engine's context-based cap is not "
                              "known there")
        num_frames = self.num_frames
        if num_frames is None and self.fps is None:
            from ..presets import default_frames
            num_frames = default_frames(self.model)
        try:
            spec = SamplingSpec.from_args(num_frames, self.fps, self.max_frames)
        except RequestError as error:
            raise ConfigError(f"corpus frame sampling: {error}") from error
        self.num_frames, self.fps, self.max_frames = spec.num_frames, spec.fps, spec.max_frames
        if not isinstance(self.sampling, SamplingParams):
            raise ConfigError(f"corpus sampling must be SamplingParams, got {type(self.sampling).__name__}")
        if not self.video_timeout_s > 0:
            raise ConfigError(f"corpus video_timeout_s = {self.video_timeout_s!r}: expected seconds > 0")

    @property
    def decode_in_engine(self) -> bool:
        """Whether each engine decodes its videos itself (see the class docstring)."""
        from ..presets import SLOWFOCUS_MODELS, is_slowfocus_directory

        return self.focus is not None or self.model in SLOWFOCUS_MODELS or is_slowfocus_directory(self.model)

    @property
    def frame_sampling(self) -> dict:
        return dict(num_frames=self.num_frames, fps=self.fps, max_frames=self.max_frames)

    def engine_arguments(self) -> dict:
        """LLM(...) keyword arguments: the job's sampling and backend unless engine_kwargs sets them."""
        return {"num_frames": self.num_frames, "fps": self.fps, "max_frames": self.max_frames,
                "video_backend": self.video_backend, "video_timeout_s": self.video_timeout_s, **self.engine_kwargs}

    def settings(self) -> dict:
        """What decides a row's content; recorded in the output folder and compared on --resume."""
        engine = {k: repr(v) for k, v in sorted(self.engine_kwargs.items()) if k not in SPEED_ONLY_ENGINE_KWARGS}
        settings = {"model": self.model, "engine_kwargs": engine,
                    "frame_sampling": self.frame_sampling, "sampling": vars(self.sampling),
                    "output_format": self.output_format, "video_backend": self.video_backend}
        if self.focus is not None:   # absent otherwise: folders written before focus existed still resume
            settings["focus"] = self.focus
        return settings


def prepare_output(directory: str, job: CorpusJob, manifest_ids: list, resume: bool) -> dict:
    """Readies the folder and returns {id: shard} of the rows already written (empty unless resume).

    Without resume the folder must hold no shards; with it, leftovers of interrupted writes are removed and the
    written ids must all be manifest ids, answered with the same settings."""
    os.makedirs(directory, exist_ok=True)
    settings_path = os.path.join(directory, SETTINGS_FILE)
    shards = list_shards(directory)
    if shards and not resume:
        raise CorpusError(f"output {directory!r} already holds {len(shards)} shard(s): pass --resume to finish that "
                          f"job, or choose an empty folder")
    wanted = json.loads(json.dumps(job.settings()))  # as it reads back from the file
    if os.path.exists(settings_path):
        with open(settings_path, encoding="utf-8") as handle:
            recorded = json.load(handle)
        changed = sorted(k for k in set(wanted) | set(recorded) if wanted.get(k) != recorded.get(k))
        if changed and (shards or resume):
            raise CorpusError(f"output {directory!r} was written with other settings ({', '.join(changed)}: "
                              f"{[recorded.get(k) for k in changed]} there, {[wanted.get(k) for k in changed]} now); "
                              f"rerun with the same settings or choose an empty folder")
    elif shards:
        raise CorpusError(f"output {directory!r} holds shards but no {SETTINGS_FILE}: not a corpus output folder")
    write_json_atomically(settings_path, wanted)
    remove_temp_files(directory)
    done = written_ids(directory) if resume else {}
    strangers = set(done) - set(manifest_ids)
    if strangers:
        raise CorpusError(f"output {directory!r} holds {len(strangers)} id(s) that are not in the manifest "
                          f"({sorted(strangers)[:5]}): it belongs to another manifest; choose an empty folder")
    return done


def write_json_atomically(path: str, value) -> None:
    temp = f"{os.path.join(os.path.dirname(path), '.tmp-')}{os.getpid()}-{os.path.basename(path)}"
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)
    os.replace(temp, path)
