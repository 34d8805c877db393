"""Video decoding before and after resizing while decoding: frames/s and peak memory of one request.

"source" decodes at the video's resolution and preprocesses afterwards (the engine before frames were resized while
decoding); "resized" decodes with image_size=224 (frame_collector.py), then preprocesses 224 x 224 frames (no resize
left to do). Each (backend, mode) runs in its own process; its peak RSS is the kernel's high-water mark (VmHWM,
reset through /proc/self/clear_refs after a warm-up decode) over what the process held then, after decoding and
after preprocessing (which adds the float32 pixels [T, 3, 224, 224] the ViT reads: 361 MB for 600 frames). Decoding is CPU work, so CPU rows are the figures that matter here.

    python bench/bench_decode.py                        # 720p, 240 frames, every frame sampled
    python bench/bench_decode.py --record               # also appends rows to bench/results/decode.csv
    python bench/bench_decode.py --video V.mp4 --frames 600
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import append_csv, device_name, format_table, git_commit, utc_date  # noqa: E402

MEASURE = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
from dynfocus_infer.preprocess import preprocess_frames
from dynfocus_infer.video_decode import decode_video
path, backend, frames, mode, _, device = sys.argv[1:7]
size = 224 if mode == "resized" else None
decode_video(path, num_frames=2, backend=backend, image_size=size, resize_device=device, timeout_s=None)
hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
open("/proc/self/clear_refs", "w").write("5")
before = hwm()
start = time.perf_counter()
video = decode_video(path, num_frames=int(frames), backend=backend, image_size=size, resize_device=device,
                     timeout_s=None)
decoded = time.perf_counter()
decode_peak = hwm()
pixels = preprocess_frames(video.frames, device=device)
if pixels.is_cuda:
    torch.cuda.synchronize()
done = time.perf_counter()
peak = hwm()
print(json.dumps({"frames": video.frames.shape[0], "decode_fps": video.frames.shape[0] / (decoded - start),
                  "decode_preprocess_fps": video.frames.shape[0] / (done - start),
                  "decode_peak_mb": (decode_peak - before) / 1024, "decode_preprocess_peak_mb": (peak - before) / 1024}))
"""


def _make_video(path: Path, num_frames: int, height: int, width: int) -> None:
    from dynfocus_infer.video import write_test_video

    write_test_video(path, num_frames=num_frames, fps=30, height=height, width=width, crf=23)


def _video_shape(path: Path) -> str:
    """frames x height x width x codec of the video's first stream."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return f"{stream.frames}x{stream.height}x{stream.width} {stream.codec_context.name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", help="a video file (default: a generated 720p clip of moving shapes)")
    parser.add_argument("--frames", type=int, default=240, help="frames to sample (uniform; default 240)")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (default 1)")
    parser.add_argument("--device", default="cpu", help="where frames are resized and preprocessed (default cpu)")
    parser.add_argument("--record", action="store_true", help="append rows to bench/results/decode.csv")
    args = parser.parse_args()
    from dynfocus_infer.video import available_backends

    with tempfile.TemporaryDirectory() as folder:
        video = Path(args.video) if args.video else Path(folder) / "bench.mp4"
        if not args.video:
            _make_video(video, args.frames, args.height, args.width)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        rows = []
        for backend in available_backends():
            for mode in ("source", "resized"):
                result = subprocess.run([sys.executable, "-c", MEASURE, str(video), backend, str(args.frames), mode,
                                         str(args.threads), args.device], capture_output=True, text=True, env=env,
                                        check=True)
                rows.append({"backend": backend, "mode": mode, **json.loads(result.stdout.splitlines()[-1])})
        shape = _video_shape(video)
    print(format_table(rows, ["backend", "mode", "frames", "decode_fps", "decode_preprocess_fps", "decode_peak_mb",
                              "decode_preprocess_peak_mb"]))
    if args.record:  # decoding runs on the CPU: a CPU run's figures are the real ones (no GPU gate here)
        meta = {"device": device_name(args.device), "commit": git_commit(), "date": utc_date(),
                "video": shape, "sampled": args.frames, "threads": args.threads}
        print(f"appended {len(rows)} rows to {append_csv('decode', [{**meta, **row} for row in rows])}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"({time.perf_counter() - started:.0f} s)")
