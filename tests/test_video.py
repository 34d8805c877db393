"""Video input: sampling rules, decord/PyAV agreement, bad files, the loader, timeouts, preprocessing."""
import os
import threading
import time

import numpy as np
import pytest
import torch

from dynfocus_infer import video_decode
from dynfocus_infer.errors import RequestError, VideoDecodeError
from dynfocus_infer.preprocess import CLIP_STD, preprocess_frames
from dynfocus_infer.video import (VideoLoader, available_backends, decode_video, fps_frame_indices,
                                  render_test_frames, uniform_frame_indices, write_test_video)

av = pytest.importorskip("av")
BACKENDS = available_backends()
NUM_FRAMES, FPS = 64, 8
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A good video, the source frames it was encoded from, and one file per way of being bad."""
    root = tmp_path_factory.mktemp("videos")
    good = root / "good.mp4"
    source = write_test_video(good, num_frames=NUM_FRAMES, fps=FPS)
    # faststart puts the frame index in front, so a copy missing its last bytes still lists all 64 frames.
    # crf 10 keeps every packet above 100 bytes, so cutting 100 bytes damages exactly the last frame.
    faststart = root / "faststart.mp4"
    write_test_video(faststart, faststart=True, crf=10)
    data = faststart.read_bytes()
    paths = {"good": good, "missing": root / "missing.mp4", "empty": root / "empty.mp4",
             "text": root / "text.mp4", "truncated": root / "truncated.mp4",
             "audio_only": root / "audio_only.mp4", "header_only": root / "header_only.mp4",
             "tail_cut": root / "tail_cut.mp4"}
    paths["empty"].write_bytes(b"")
    paths["text"].write_text("this is a text file, not a video\n" * 20)
    paths["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # index (moov) lost
    paths["header_only"].write_bytes(data[: data.find(b"mdat") + 54])           # index, no whole frame
    paths["tail_cut"].write_bytes(data[:-100])                                   # last frame cut short
    with av.open(str(paths["audio_only"]), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return paths, torch.from_numpy(source)


def _official_uniform(n, k):
    """The authors' rule verbatim (llamavid/eval/model_videomme_general.py)."""
    scale = 1.0 * n / k
    return [round((i + 1) * scale - 1) for i in range(k)]


@pytest.mark.parametrize("num_source_frames", [7, 16, 17, 64, 199, 201, 1000, 4501])
@pytest.mark.parametrize("num_frames", [1, 16, 32, 200])
def test_uniform_indices_follow_the_official_rule(num_source_frames, num_frames):
    indices = uniform_frame_indices(num_source_frames, num_frames)
    if num_source_frames <= num_frames:
        assert indices.tolist() == list(range(num_source_frames))
        return
    assert indices.tolist() == _official_uniform(num_source_frames, num_frames)
    assert len(indices) == num_frames and indices[-1] == num_source_frames - 1
    assert (np.diff(indices) > 0).all()


def test_fps_indices_stride_and_cap():
    assert fps_frame_indices(95, 30.0, 1.0).tolist() == [0, 30, 60, 90]
    assert fps_frame_indices(95, 29.97, 1.0).tolist() == [0, 30, 60, 90]   # round(29.97) = 30
    assert fps_frame_indices(30, 25.0, 2.0).tolist() == [0, 12, 24]         # round(12.5) = 12, half to even
    assert fps_frame_indices(5, 8.0, 30.0).tolist() == [0, 1, 2, 3, 4]     # faster than the source: all
    every_second = np.arange(0, 30 * 3000, 30)
    capped = fps_frame_indices(30 * 3000, 30.0, 1.0, max_frames=200)
    assert capped.tolist() == every_second[_official_uniform(3000, 200)].tolist()


def _assert_frames_are_the_sampled_ones(decoded, source):
    """Each decoded frame is closest to the source frame it claims to be (the shape moves every frame; compared
    on every 4th pixel), and the content matches (H.264 at crf 23 leaves a mean error of ~1.5 levels; a channel
    swap or a neighbouring frame gives far more)."""
    thumbs = decoded.frames[:, ::4, ::4].flatten(1).float()
    source_thumbs = source[:, ::4, ::4].flatten(1).float()
    nearest = torch.cdist(thumbs, source_thumbs, p=1).argmin(dim=1)
    assert nearest.tolist() == decoded.frame_indices.tolist()
    claimed = source[decoded.frame_indices].float()
    assert (decoded.frames.float() - claimed).abs().mean(dim=(1, 2, 3)).max().item() < 3.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_frames", [16, 32, 200])
def test_uniform_sampling_of_a_file(videos, backend, num_frames):
    paths, source = videos
    decoded = decode_video(paths["good"], num_frames=num_frames, backend=backend)
    expected = uniform_frame_indices(NUM_FRAMES, num_frames)   # 200 > 64 frames: all of them
    assert decoded.frame_indices.tolist() == expected.tolist()
    assert decoded.frames.shape == (len(expected), 240, 320, 3) and decoded.frames.dtype == torch.uint8
    assert decoded.backend == backend and decoded.num_source_frames == NUM_FRAMES
    assert decoded.source_fps == pytest.approx(FPS) and decoded.duration_s == pytest.approx(NUM_FRAMES / FPS)
    _assert_frames_are_the_sampled_ones(decoded, source)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_fps_sampling_of_a_file(videos, backend):
    paths, source = videos
    decoded = decode_video(paths["good"], fps=1.0, backend=backend)
    assert decoded.frame_indices.tolist() == list(range(0, NUM_FRAMES, FPS))
    assert decoded.timestamps_s.tolist() == [float(second) for second in range(NUM_FRAMES // FPS)]
    _assert_frames_are_the_sampled_ones(decoded, source)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both decord and PyAV")
@pytest.mark.parametrize("sampling", [dict(num_frames=16), dict(num_frames=200), dict(fps=1.0)])
def test_decord_and_pyav_give_the_same_frames(videos, sampling):
    paths, _ = videos
    by_decord = decode_video(paths["good"], backend="decord", **sampling)
    by_pyav = decode_video(paths["good"], backend="pyav", **sampling)
    assert torch.equal(by_decord.frame_indices, by_pyav.frame_indices)
    difference = (by_decord.frames.float() - by_pyav.frames.float()).abs()
    # Measured: identical (max 0) with decord 0.6 and PyAV 18.1; allow the rounding of another
    # colour-conversion build, far below a wrong frame (mean > 10) or a channel swap.
    assert difference.max().item() <= 2 and difference.mean().item() <= 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_container_without_a_frame_count(tmp_path, backend):
    """Matroska lists no frame count (PyAV counts packets instead); 40 frames, uniform 16."""
    path = tmp_path / "scenes.mkv"
    source = torch.from_numpy(write_test_video(path, num_frames=40))
    decoded = decode_video(path, num_frames=16, backend=backend)
    assert decoded.num_source_frames == 40
    assert decoded.frame_indices.tolist() == uniform_frame_indices(40, 16).tolist()
    _assert_frames_are_the_sampled_ones(decoded, source)


def test_in_memory_frames_are_sampled_not_decoded(videos):
    _, source = videos
    for frames in (source, source.numpy()):
        decoded = decode_video(frames, num_frames=16)
        assert decoded.backend == "memory" and decoded.duration_s is None
        assert torch.equal(decoded.frames, source[uniform_frame_indices(NUM_FRAMES, 16)])
    short = decode_video(source[:5], num_frames=16)
    assert short.frame_indices.tolist() == [0, 1, 2, 3, 4] and torch.equal(short.frames, source[:5])
    at_one_fps = decode_video(source, fps=1.0, source_fps=FPS)
    assert at_one_fps.frame_indices.tolist() == list(range(0, NUM_FRAMES, FPS))
    with pytest.raises(VideoDecodeError, match="frame rate is unknown"):
        decode_video(source, fps=1.0)
    with pytest.raises(RequestError, match="uint8"):
        decode_video(source.float())
    for empty_image in (source[:, :0], source[:, :, :0]):
        with pytest.raises(RequestError, match="H, W >= 1"):
            decode_video(empty_image, num_frames=4)
    with pytest.raises(VideoDecodeError, match="zero frames"):
        decode_video(source[:0])


def test_bad_arguments_are_request_errors(videos):
    paths, _ = videos
    with pytest.raises(RequestError, match="not both"):
        decode_video(paths["good"], num_frames=8, fps=1.0)
    with pytest.raises(RequestError, match="backend"):
        decode_video(paths["good"], backend="opencv")
    with pytest.raises(RequestError, match="num_frames"):
        decode_video(paths["good"], num_frames=0)
    with pytest.raises(RequestError, match="max_frames"):
        decode_video(paths["good"], num_frames=8, max_frames=4)
    with pytest.raises(RequestError, match="path or uint8 frames"):
        decode_video(42)


@pytest.mark.parametrize("kwargs,match", [(dict(timeout_s=0), "timeout_s"), (dict(timeout_s="5"), "timeout_s"),
                                          (dict(num_frames=0), "num_frames"), (dict(fps=-1.0), "fps"),
                                          (dict(fps="1"), "fps"), (dict(fps=1.0, max_frames=2.5), "max_frames")])
def test_bad_loader_settings_are_config_errors(kwargs, match):
    from dynfocus_infer.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        VideoLoader(num_workers=1, **kwargs)


BAD_FILES = {"missing": "no such file", "empty": "empty \\(0 bytes\\)", "text": "not a readable video",
             "truncated": "not a readable video", "audio_only": "video stream",
             "header_only": "zero frames|not a readable video"}


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files_raise_video_decode_error(videos, kind, backend):
    paths, _ = videos
    with pytest.raises(VideoDecodeError, match=BAD_FILES[kind]) as caught:
        decode_video(paths[kind], backend=backend, timeout_s=30)
    assert str(paths[kind]) in str(caught.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tags_that_are_not_utf8_do_not_stop_decoding(videos, tmp_path, backend):
    """A good video whose title tag is Latin-1: PyAV decodes tags as strict UTF-8 unless told otherwise."""
    paths, source = videos
    latin = tmp_path / "latin1_tags.mp4"
    with av.open(str(paths["good"])) as src, av.open(str(latin), "w", metadata_encoding="latin-1") as dst:
        dst.metadata["title"] = "caf\u00e9 \u00e9t\u00e9"
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    with pytest.raises(UnicodeDecodeError):  # the trap this guards against
        with av.open(str(latin)) as container:
            container.metadata
    decoded = decode_video(latin, num_frames=8, backend=backend)
    assert decoded.num_source_frames == NUM_FRAMES
    _assert_frames_are_the_sampled_ones(decoded, source)


@pytest.mark.skipif("decord" not in BACKENDS, reason="needs decord")
def test_a_decord_message_that_is_not_utf8_is_a_video_decode_error(videos, monkeypatch):
    """decord's FFI decodes its C++ error text as strict UTF-8; on a garbage file that text can quote raw bytes, and
    the open raises UnicodeDecodeError (a random-bytes upload once made the server answer 500)."""
    import decord
    paths, _ = videos
    message = b"ERROR opening: probed format \x9d\xfe, no video stream"

    def failing_open(*args, **kwargs):
        raise UnicodeDecodeError("utf-8", message, 23, 24, "invalid start byte")

    monkeypatch.setattr(decord, "VideoReader", failing_open)
    with pytest.raises(VideoDecodeError, match="decord: ERROR opening: probed format .*no video stream"):
        decode_video(paths["good"], backend="decord")
    assert decode_video(paths["good"], num_frames=4, backend="auto").backend == "pyav"


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both decord and PyAV")
def test_frames_listed_but_not_decodable_fall_back_to_pyav(videos):
    paths, source = videos
    with pytest.raises(VideoDecodeError, match="lists 64 frames"):
        decode_video(paths["tail_cut"], backend="decord")
    decoded = decode_video(paths["tail_cut"], num_frames=16, backend="auto")
    assert decoded.backend == "pyav" and 0 < decoded.num_source_frames < NUM_FRAMES
    assert decoded.frame_indices.tolist() == uniform_frame_indices(decoded.num_source_frames, 16).tolist()
    _assert_frames_are_the_sampled_ones(decoded, torch.from_numpy(render_test_frames()))


def test_loader_keeps_going_past_bad_videos(videos):
    paths, source = videos
    sources = [paths["empty"], paths["truncated"], paths["text"], paths["good"], source.numpy()]
    with VideoLoader(num_workers=3, num_frames=16, timeout_s=30) as loader:
        results = list(loader.map(sources))
        unordered = sorted(result.index for result in loader.map(sources, ordered=False))
    assert [result.index for result in results] == list(range(5)) and unordered == list(range(5, 10))
    for result in results[:3]:
        assert not result.ok and isinstance(result.error, VideoDecodeError) and result.frames is None
        assert str(result.source) in str(result.error)
    for result in results[3:]:
        assert result.ok and result.frames.frames.shape == (16, 240, 320, 3)
    assert torch.equal(results[3].frames.frame_indices, results[4].frames.frame_indices)


def test_loader_decodes_in_parallel(videos, monkeypatch):
    """Four 0.4 s decodes on four workers take about 0.4 s, not 1.6 s (sleep stands in for GIL-free decoding)."""
    paths, _ = videos
    for name, decode in list(video_decode._BACKENDS.items()):
        def slow_decode(path, spec, decode=decode):
            time.sleep(0.4)
            return decode(path, spec)
        monkeypatch.setitem(video_decode._BACKENDS, name, slow_decode)
    started = time.perf_counter()
    with VideoLoader(num_workers=4, num_frames=4) as loader:
        results = list(loader.map([paths["good"]] * 4))
    assert all(result.ok for result in results)
    assert time.perf_counter() - started < 1.2


@pytest.fixture
def hanging_backends(monkeypatch, videos):
    """Both backends hang on good.mp4 (as decord does on some over-reported containers) until released."""
    release = threading.Event()
    paths, _ = videos
    for name, decode in list(video_decode._BACKENDS.items()):
        def hang_on_good(path, spec, decode=decode):
            if path == str(paths["good"]):
                release.wait()
                raise VideoDecodeError("released")
            return decode(path, spec)
        monkeypatch.setitem(video_decode._BACKENDS, name, hang_on_good)
    yield
    release.set()  # let the abandoned threads finish before the next test


def test_a_hanging_decode_times_out(videos, hanging_backends):
    paths, source = videos
    started = time.perf_counter()
    with pytest.raises(VideoDecodeError, match="did not finish within 0.5 s"):
        decode_video(paths["good"], timeout_s=0.5)
    assert time.perf_counter() - started < 3.0
    with VideoLoader(num_workers=2, num_frames=8, timeout_s=0.5) as loader:
        hung, fine = list(loader.map([paths["good"], source]))
    assert isinstance(hung.error, VideoDecodeError) and fine.ok and fine.frames.frames.shape[0] == 8


def _clip_reference(frames):
    try:  # transformers 5: the PIL backend by name (the default class wants torchvision)
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL implementation
        from transformers import CLIPImageProcessor as Processor

    pixel_values = Processor()(list(frames.numpy()), return_tensors=None)["pixel_values"]
    return torch.from_numpy(np.stack(pixel_values))


# One uint8 level after normalisation, for the channel with the smallest std.
ONE_LEVEL = 1.0 / (255.0 * min(CLIP_STD))


@pytest.mark.parametrize("height,width", [(240, 320), (320, 240), (224, 224), (97, 131), (131, 97), (480, 640),
                                          (225, 301), (301, 225)])
@pytest.mark.parametrize("content", ["noise", "scenes"])
def test_preprocess_matches_clip_image_processor(device, height, width, content):
    if content == "noise":  # worst case for bicubic overshoot and clamping
        frames = torch.randint(0, 256, (3, height, width, 3), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(height * width))
    else:
        frames = torch.from_numpy(render_test_frames(3, height, width, num_scenes=3))
    ours = preprocess_frames(frames, device=device).cpu()
    reference = _clip_reference(frames)
    assert ours.shape == reference.shape == (3, 3, 224, 224) and ours.dtype == torch.float32
    error = (ours - reference).abs()
    # Measured on CPU over these cases: max = one uint8 level (0.0150; fixed-point vs float rounding ties),
    # on at most 0.07% of values, mean <= 1e-5. Resizing in one pass instead of PIL's two gives ~24 levels on
    # noise; bilinear, a crop off by one pixel or a wrong mean/std give mean errors above 1e-2.
    assert error.max().item() <= ONE_LEVEL * 1.001
    assert (error > 1e-3).float().mean().item() < 0.005
    assert error.mean().item() < 1e-4


def test_preprocess_chunks_and_dtype_do_not_change_the_result(device):
    frames = torch.from_numpy(render_test_frames(7, 120, 170, num_scenes=2))
    whole = preprocess_frames(frames, device=device)
    chunked = preprocess_frames(frames, device=device, chunk_bytes=1)   # one frame per chunk
    assert torch.equal(whole, chunked)
    half = preprocess_frames(frames, device=device, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.device.type == torch.device(device).type
    torch.testing.assert_close(half.float(), whole, atol=0.02, rtol=0.01)
    with pytest.raises(RequestError, match=r"uint8 RGB frames \[T, H, W, 3\]"):
        preprocess_frames(frames.permute(0, 3, 1, 2))


def test_write_test_video_is_deterministic(tmp_path):
    first, second = tmp_path / "a.mp4", tmp_path / "b.mp4"
    write_test_video(first, num_frames=16)
    write_test_video(second, num_frames=16)
    assert first.read_bytes() == second.read_bytes()


def test_bundled_sample_video():
    """assets/sample.mp4 is video (seed, index) of the synthetic family, as assets/sample.json says, and its question's
    expected answer is the one the family's questions give for that scene."""
    import json

    from dynfocus_infer.synthetic.questions import questions_for
    from dynfocus_infer.synthetic.render import render_frames
    from dynfocus_infer.synthetic.scene import sample_scene

    path = os.path.join(REPO_ROOT, "assets", "sample.mp4")
    card = json.loads(open(os.path.join(REPO_ROOT, "assets", "sample.json")).read())
    scene = sample_scene(card["seed"], card["index"])
    assert card["scene"] == json.loads(json.dumps(scene.to_dict()))
    assert {"question": card["question"], "answer": card["answer"]} in [
        {"question": q["question"], "answer": q["answer"]} for q in questions_for(scene)]
    assert os.path.getsize(path) < 300 * 1024
    decoded = decode_video(path, num_frames=12)
    assert decoded.num_source_frames == scene.num_frames and decoded.source_fps == pytest.approx(scene.fps)
    assert decoded.frames.shape == (12, scene.height, scene.width, 3)
    source = torch.from_numpy(render_frames(scene, decoded.frame_indices.tolist()))
    assert (decoded.frames.float() - source.float()).abs().mean(dim=(1, 2, 3)).max().item() < 3.0