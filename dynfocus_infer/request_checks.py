"""Checks that need no model: the command's options and each batch line, done before the (seconds-long) model load.

Errors name what was wrong in the user's own terms: the CLI option (`--fps`), or the request by its id or line.
"""
from __future__ import annotations

import math
import os
import re
from typing import Optional

from .errors import ConfigError, RequestError
from .outputs import Request
from .presets import PRESETS, SLOWFOCUS_MODELS, check_device
from .video_decode import video_path_problem

# The forms of models/baselines.py's encoder names (which sizes exist depends on the model's config).
_ENCODER_NAME = re.compile(r"dynfocus|full|llama-vid|pool-\d+x\d+|uniform-\d+|dynfocus-L\d+-r\d+(\.\d+)?|"
                           r"dynfocus-(rods-off|cones-off|coarse|uncompressed)")


def check_model_options(args) -> None:
    """--model, --random-weights, --device, --frames / --fps / --max-frames, as far as they can be judged unloaded."""
    if args.frames is not None and args.frames < 1:
        raise ConfigError(f"--frames {args.frames}: expected an integer >= 1")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise ConfigError(f"--fps {args.fps}: expected a finite number > 0 (frames per second)")
    if args.max_frames is not None:
        if args.fps is None:
            raise ConfigError("--max-frames caps --fps sampling; with --frames (or neither) it does not apply")
        if args.max_frames < 1:
            raise ConfigError(f"--max-frames {args.max_frames}: expected an integer >= 1")
    if args.model in ("dynfocus-7b", "slowfocus-7b") and not args.random_weights:
        raise ConfigError(f"--model {args.model} needs weights: pass its checkpoint directory as --model, or add "
                          f"--random-weights to benchmark its shapes")
    if args.random_weights and args.model not in ("dynfocus-7b", "slowfocus-7b"):
        raise ConfigError(f"--random-weights only applies to --model dynfocus-7b or slowfocus-7b, not "
                          f"{args.model!r}")
    if not _ENCODER_NAME.fullmatch(args.visual_encoder):  # the exact list needs the model; typos are caught now
        raise ConfigError(f"--visual-encoder {args.visual_encoder!r} is unknown: expected dynfocus, full, pool-GxG, "
                          f"llama-vid, uniform-K, dynfocus-L<events>-r<keep ratio> (e.g. dynfocus-L25-r0.8) or a Table 6 switch "
                          f"(dynfocus-rods-off, dynfocus-cones-off, dynfocus-coarse, dynfocus-uncompressed)")
    if args.model not in PRESETS + SLOWFOCUS_MODELS and not os.path.isdir(args.model):
        raise ConfigError(f"model {args.model!r} is neither a preset ({', '.join(PRESETS + SLOWFOCUS_MODELS)}) nor a "
                          f"checkpoint directory")
    check_device(args.device)


def check_video_path(video: str, base_dir: Optional[str] = None) -> str:
    """The video's path (a relative one joined to base_dir when given), or a RequestError saying why it is unusable."""
    path = video if base_dir is None or os.path.isabs(video) else os.path.join(base_dir, video)
    problem = video_path_problem(path)
    if problem is not None:
        shown = video if path == video else f"{video} (resolved to {path})"
        raise RequestError(f"video {shown}: {problem}")
    return path


def request_label(value: dict, position: str) -> str:
    """How messages name a request: its id when it has one, else its position."""
    given = value.get("id", value.get("request_id")) if isinstance(value, dict) else None
    return f"request {str(given)!r}" if given is not None else position


def check_request(value: dict, base_dir: Optional[str] = None) -> dict:
    """A batch line's request with its video path resolved against base_dir (the JSONL's folder), validated as the
    engine would (fields, question, num_frames / fps, the video file) but without the model. Raises RequestError."""
    request = Request.coerce(value)
    if request.video is not None:
        if not isinstance(request.video, str):
            raise RequestError(f"video must be a file path (a string) or null, got {type(request.video).__name__}")
        value = {**value, "video": check_video_path(request.video, base_dir)}
    return value



def coerce_requests(requests) -> list:
    """generate()'s requests as a list of Requests, or, for each one that is malformed, the RequestError it fails
    with: that request alone fails, named by its id or its position. A `requests` that is not a request nor an
    iterable of them fails the whole call."""
    if isinstance(requests, (Request, str, dict)):
        requests = [requests]
    if requests is None or isinstance(requests, bytes) or not hasattr(requests, "__iter__"):
        raise RequestError(f"requests must be a question string, a Request, a dict, or an iterable of them; got "
                           f"{type(requests).__name__}")
    items = []
    for position, value in enumerate(requests):
        try:
            items.append(Request.coerce(value))
        except RequestError as error:
            given = value.get("id", value.get("request_id")) if isinstance(value, dict) else None
            named = RequestError(f"{request_label(value, f'request {position}')}: {error}")
            named.request_id = None if given is None else str(given)  # the rejected request keeps its caller's id
            items.append(named)
    return items


def sampling_params_for(sampling_params, num_requests: int) -> list:
    """One SamplingParams per request, from None (the defaults), one SamplingParams, or one each."""
    from .sampling import SamplingParams

    hint = "a SamplingParams, or a list of them (one per request)"
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or SamplingParams()] * num_requests
    if isinstance(sampling_params, dict):
        raise RequestError(f"sampling_params must be {hint}, got a dict: write SamplingParams(**your_dict)")
    if isinstance(sampling_params, (str, bytes)) or not hasattr(sampling_params, "__iter__"):
        raise RequestError(f"sampling_params must be {hint}, got {type(sampling_params).__name__}")
    sampling_params = list(sampling_params)
    if len(sampling_params) != num_requests:
        raise RequestError(f"{len(sampling_params)} SamplingParams for {num_requests} requests: pass one, or one each")
    for position, params in enumerate(sampling_params):
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling_params[{position}] must be a SamplingParams, got {type(params).__name__}")
    return sampling_params
