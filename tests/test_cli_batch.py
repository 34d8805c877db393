"""The batch command's run: checks before the model loads, relative paths, --resume, the lock, SIGINT / SIGTERM."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dynfocus_infer import cli
from dynfocus_infer.outputs import RequestOutput, StreamChunk
from dynfocus_infer.video import write_test_video

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeLLM:
    """Answers every request with its question (in reverse order, to exercise the ordered writer); records calls."""

    def __init__(self):
        self.requests = []

    def stream(self, requests, sampling, progress=False):
        self.requests = list(requests)
        for index in reversed(range(len(self.requests))):
            request = self.requests[index]
            output = RequestOutput(request["id"], text=request["question"], finish_reason="stop")
            yield StreamChunk(index, request["id"], "", True, output)


@pytest.fixture
def fake_engine(monkeypatch):
    engine = FakeLLM()
    loads = []

    def build(args, batch_size=8):
        loads.append(args.model)
        return engine
    monkeypatch.setattr(cli, "_engine", build)
    engine.loads = loads
    return engine


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("option,value,message", [
    ("--frames", "0", "--frames 0: expected an integer >= 1"),
    ("--fps", "inf", "--fps inf: expected a finite number > 0"),
    ("--fps", "nan", "--fps nan"),
    ("--max-frames", "5", "--max-frames caps --fps sampling"),
    ("--temperature", "inf", "temperature"),
    ("--model", "dynfocus-7b", "--random-weights to benchmark"),
    ("--random-weights", None, "--random-weights only applies to --model dynfocus-7b or slowfocus-7b"),
    ("--visual-encoder", "pool4x4", "--visual-encoder 'pool4x4' is unknown"),
])
def test_bad_options_fail_before_the_model_loads(tmp_path, fake_engine, capsys, option, value, message):
    requests = _write_jsonl(tmp_path / "in.jsonl", [{"question": "q?"}])
    extra = [option] if value is None else [option, value]
    code = cli.main(["batch", "--input", str(requests), "--output", str(tmp_path / "out.jsonl"), *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert fake_engine.loads == [] and not (tmp_path / "out.jsonl").exists()


def test_answer_checks_the_video_and_question_before_the_model_loads(tmp_path, fake_engine, capsys):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.mp4"
    loop.symlink_to(loop.name)
    for video, message in ((str(tmp_path), "is a directory, not a video file"),
                           (str(fifo), "is not a regular file (a FIFO)"),
                           (str(loop), "cannot be read"),
                           ("https://example.com/v.mp4", "is a URL"),
                           (str(tmp_path / "missing.mp4"), "does not exist")):
        assert cli.main(["answer", "--video", video, "--question", "q?"]) == 2
        assert message in capsys.readouterr().err, video
    assert cli.main(["answer", "--question", "   "]) == 2
    assert "question must be a non-empty string" in capsys.readouterr().err
    assert fake_engine.loads == []


def test_lines_that_fail_their_checks_need_no_model(tmp_path, fake_engine):
    requests = _write_jsonl(tmp_path / "in.jsonl", [{"id": "dir", "question": "q?", "video": str(tmp_path)},
                                                    {"question": "", "video": "x.mp4"},
                                                    {"id": "n", "question": "q?", "video": 3}])
    output = tmp_path / "out.jsonl"
    assert cli.main(["batch", "--input", str(requests), "--output", str(output)]) == 0
    records = _records(output)
    assert [r["request_id"] for r in records] == ["dir", "2", "n"]
    assert "is a directory" in records[0]["error"] and "non-empty" in records[1]["error"]
    assert "video must be a file path" in records[2]["error"]
    assert fake_engine.loads == []


def test_relative_video_paths_are_read_from_the_jsonl_folder(tmp_path, fake_engine, monkeypatch):
    folder = tmp_path / "job"
    folder.mkdir()
    write_test_video(folder / "clip.mp4", num_frames=4)
    requests = _write_jsonl(folder / "in.jsonl", [{"id": "rel", "question": "q?", "video": "clip.mp4"},
                                                  {"id": "gone", "question": "q?", "video": "nope.mp4"}])
    monkeypatch.chdir(tmp_path)                       # the working directory holds no clip.mp4
    output = tmp_path / "out.jsonl"
    assert cli.main(["batch", "--input", str(requests), "--output", str(output)]) == 0
    assert fake_engine.requests[0]["video"] == str(folder / "clip.mp4")
    gone = _records(output)[1]
    assert gone["request_id"] == "gone" and f"nope.mp4 (resolved to {folder / 'nope.mp4'})" in gone["error"]


def test_resume_skips_the_ids_already_written(tmp_path, fake_engine, capsys):
    requests = _write_jsonl(tmp_path / "in.jsonl", [{"id": i, "question": f"q{i}?"} for i in "abcd"])
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps(RequestOutput("b", text="earlier", finish_reason="stop").to_dict()) + "\n")
    assert cli.main(["batch", "--input", str(requests), "--output", str(output), "--resume"]) == 0
    assert [r["request_id"] for r in _records(output)] == ["b", "a", "c", "d"]
    assert _records(output)[0]["text"] == "earlier"
    assert [r["id"] for r in fake_engine.requests] == ["a", "c", "d"]
    err = capsys.readouterr().err
    assert "3 answered, 0 failed" in err and "1 skipped (already in the output)" in err


def test_output_dash_goes_to_stdout(tmp_path, fake_engine, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    requests = _write_jsonl(tmp_path / "in.jsonl", [{"question": "one?"}, {"question": "two?"}])
    assert cli.main(["batch", "--input", str(requests), "--output", "-"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["text"] for line in captured.out.splitlines()] == ["one?", "two?"]
    assert "-> standard output" in captured.err and not (tmp_path / "-").exists()


def test_a_second_run_on_a_locked_output_is_refused(tmp_path):
    requests = _write_jsonl(tmp_path / "in.jsonl", [{"question": "q?"}])
    output = tmp_path / "out.jsonl"
    output.write_text("RUNNING\n")
    with open(output) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)            # what a running batch holds
        result = subprocess.run([sys.executable, "-m", "dynfocus_infer.cli", "batch", "--input", str(requests),
                                 "--output", str(output), "--model", "tiny"], capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 2
    assert f"--output {str(output)!r} is being written by another dynfocus-infer run" in result.stderr
    assert output.read_text() == "RUNNING\n"


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_the_batch_cleanly_keeping_finished_results(tmp_path, signum, code):
    num_requests = 40
    requests = _write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "question": f"Count to {i}."}
                                                    for i in range(num_requests)])
    output = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "dynfocus_infer.cli", "batch", "--input", str(requests), "--output", str(output),
            "--model", "tiny", "--batch-size", "1", "--max-tokens", "64"]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if output.exists() and output.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the batch ended before it could be interrupted"
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    name = signal.Signals(signum).name
    summary = [line for line in stderr.splitlines() if line.startswith("dynfocus-infer: interrupted")]
    assert len(summary) == 1 and f"interrupted by {name}" in summary[0] and "rerun with --resume" in summary[0]
    text = output.read_text()
    assert text.endswith("\n")
    written = [json.loads(line) for line in text.splitlines()]   # whole lines only
    assert 2 <= len(written) < num_requests and all(r["error"] is None for r in written)
    assert f"{len(written)} answered" in summary[0] and f"{num_requests - len(written)} not run" in summary[0]

    resumed = subprocess.run(args + ["--resume", "--max-tokens", "1"], capture_output=True, text=True, timeout=300,
                             env=env)
    assert resumed.returncode == 0, resumed.stderr
    ids = [json.loads(line)["request_id"] for line in output.read_text().splitlines()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(num_requests)) and len(ids) == num_requests
    assert f"{len(written)} skipped" in resumed.stderr
