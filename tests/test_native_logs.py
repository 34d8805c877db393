"""Decoder logs stay off the terminal: decord's C++ lines and FFmpeg's go to the logging module."""
import subprocess
import sys
import textwrap

import pytest

from dynfocus_infer.video import available_backends, write_test_video

pytest.importorskip("av")

SCRIPT = textwrap.dedent("""
    import logging, sys
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("dynfocus_infer.decoders").addHandler(handler)
    logging.getLogger("dynfocus_infer.decoders").setLevel(logging.DEBUG)
    from dynfocus_infer.errors import VideoDecodeError
    from dynfocus_infer.video_decode import decode_video
    for path in sys.argv[2:]:
        try:
            decode_video(path, backend=sys.argv[1], num_frames=8)
        except VideoDecodeError as error:
            print("error:", str(error).splitlines()[0])
    print("bystander line", file=sys.stderr)  # written between decodes: must still reach stderr
    print("logged:", len(logged), any("ERROR opening" in line for line in logged))
""")


@pytest.mark.parametrize("backend", available_backends())
def test_decoder_logs_go_to_logging_not_stderr(tmp_path, backend):
    good = tmp_path / "good.mp4"
    write_test_video(good, num_frames=16)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])   # the index is lost: decord logs "ERROR opening", FFmpeg "moov"
    result = subprocess.run([sys.executable, "-c", SCRIPT, backend, str(truncated), str(good)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "bystander line\n"
    assert f"error: {truncated}: not a readable video" in result.stdout
    if backend == "decord":
        assert "logged: 1 True" in result.stdout
