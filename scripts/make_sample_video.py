#!/usr/bin/env python3
"""Writes assets/sample.mp4: the bundled demo/test video (8 s at 8 fps, 320x240, H.264, four 2-second
scenes of a moving coloured shape on distinct backgrounds, so temporal clustering has events to find).

Deterministic: the frames come from dynfocus_infer.video.render_test_frames and the encoder runs with one
thread and fixed settings, so the same PyAV/FFmpeg build writes the same bytes.

    python scripts/make_sample_video.py [--output assets/sample.mp4]
"""
import argparse
import hashlib
import os
import sys

from dynfocus_infer.video import write_test_video

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "assets", "sample.mp4"))
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--scenes", type=int, default=4)
    args = parser.parse_args(argv)

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_test_video(args.output, num_frames=args.seconds * args.fps, fps=args.fps, height=args.height,
                     width=args.width, num_scenes=args.scenes)
    with open(args.output, "rb") as video_file:
        digest = hashlib.sha256(video_file.read()).hexdigest()[:16]
    print(f"wrote {args.output}: {os.path.getsize(args.output)} bytes, {args.seconds * args.fps} frames, "
          f"sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
