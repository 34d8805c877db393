"""`dynfocus-infer serve`: its options, checked before the model loads, and the run."""
from __future__ import annotations

import argparse
import os

from .settings import ServerSettings


def add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (chat with videos)")
    serve.add_argument("--model", default="dynfocus-smol", help="preset or checkpoint directory")
    serve.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default --model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("DYNFOCUS_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/* (default $DYNFOCUS_API_KEY; none: open)")
    serve.add_argument("--allowed-local-media-path", default=None,
                       help="a folder whose videos may be named by path or file:// URL (default: none)")
    serve.add_argument("--allow-remote-media", action="store_true",
                       help="fetch http(s) video URLs (with --max-video-bytes and --remote-timeout)")
    serve.add_argument("--max-video-bytes", type=int, default=ServerSettings.max_video_bytes)
    serve.add_argument("--max-request-bytes", type=int, default=ServerSettings.max_request_bytes)
    serve.add_argument("--remote-timeout", type=float, default=ServerSettings.remote_timeout_s)
    serve.add_argument("--max-queued-requests", type=int, default=ServerSettings.max_queued_requests,
                       help="requests in flight past which new ones get 503")
    frames = serve.add_mutually_exclusive_group()
    frames.add_argument("--frames", type=int, default=None, help="uniformly sampled frames per video (default: the model's, "
                        "12 for dynfocus-smol)")
    frames.add_argument("--fps", type=float, default=None, help="sample frames at this rate instead")
    serve.add_argument("--max-frames", type=int, default=None)
    serve.add_argument("--device", default=None)
    serve.add_argument("--random-weights", action="store_true", help="dynfocus-7b and slowfocus-7b only: random weights")
    serve.add_argument("--visual-encoder", default="dynfocus")
    serve.add_argument("--max-num-seqs", type=int, default=64)
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--kv-cache-memory", type=int, default=None, help="KV-cache bytes (CPU; default 1 GiB)")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    serve.add_argument("--no-prefix-caching", action="store_true",
                       help="compute every prompt in full instead of reusing the K/V blocks of a prefix already computed")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def settings_from(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(host=args.host, port=args.port, api_key=args.api_key,
                          served_model_name=args.served_model_name or args.model,
                          allowed_local_media_path=args.allowed_local_media_path,
                          allow_remote_media=args.allow_remote_media, max_video_bytes=args.max_video_bytes,
                          max_request_bytes=args.max_request_bytes, remote_timeout_s=args.remote_timeout,
                          max_queued_requests=args.max_queued_requests)


def run_serve(args: argparse.Namespace) -> int:
    settings = settings_from(args)  # every server option is checked before the model loads
    from ..core.async_llm import AsyncLLM
    from .app import run

    engine = AsyncLLM.from_model(
        args.model, device=args.device, num_frames=args.frames if args.fps is None else None, fps=args.fps,
        max_frames=args.max_frames, random_weights=args.random_weights, visual_encoder=args.visual_encoder,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
        enable_prefix_caching=not args.no_prefix_caching)
    if engine.notice:
        print(f"dynfocus-infer serve: note: {engine.notice}", flush=True)
    run(engine, settings, log_level=args.log_level)
    return 0
