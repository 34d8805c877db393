"""The `dynfocus-infer` command through subprocess: answers, JSONL batches with failures, exit codes."""
import json
import subprocess
import sys

import pytest

from dynfocus_infer.video import write_test_video


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dynfocus_infer.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "clip.mp4"
    write_test_video(path, num_frames=24, fps=8)
    return str(path)


def test_answer_prints_text_accounting_timings_and_notice(video):
    result = run_cli("answer", "--video", video, "--question", "What happens?", "--model", "tiny", "--frames", "6",
                     "--max-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "tokens: 6 frames" in result.stdout and "visual tokens vs 384 full" in result.stdout
    assert "timings (ms): " in result.stdout and "note: every weight is random" in result.stdout


def test_answer_json_output(video):
    result = run_cli("answer", "--video", video, "--question", "Colours?", "--model", "tiny", "--frames", "4",
                     "--max-tokens", "3", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["error"] is None and len(record["token_ids"]) == 3 and record["tokens"]["frames"] == 4


@pytest.mark.parametrize("args,message", [
    (["answer", "--video", "/nonexistent/clip.mp4", "--question", "q", "--model", "tiny"], "does not exist"),
    (["answer", "--question", "q", "--model", "no-such-preset"], "neither a preset"),
    (["answer", "--video", "x.mp4", "--question", "q", "--frames", "4", "--fps", "1"], "not allowed with"),
    (["answer", "--question", "q", "--model", "tiny", "--max-tokens", "0"], "max_tokens"),
    (["batch", "--input", "/nonexistent.jsonl", "--output", "out.jsonl"], "does not exist"),
    (["answer", "--question", "q", "--model", "tiny", "--device", "foo"], "is not a device"),
    (["answer", "--question", "q", "--model", "tiny", "--device", "cuda:7"], "cuda:7"),
])
def test_bad_input_exits_2_with_a_message(args, message):
    result = run_cli(*args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert message in result.stderr


def test_unreadable_video_in_answer_exits_2(tmp_path):
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video")
    result = run_cli("answer", "--video", str(fake), "--question", "q", "--model", "tiny", "--max-tokens", "2")
    assert result.returncode == 2 and str(fake) in result.stderr


def test_batch_writes_one_line_per_request_and_failures_stay_alone(video, tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    lines = [json.dumps({"id": "good", "question": "What happens?", "video": video}),
             "this is not json",
             json.dumps({"id": "empty", "question": "Anything?", "video": str(empty)}),
             json.dumps({"id": "text", "question": "Hello?"}),
             json.dumps({"question": "No id?"})]
    lines.insert(3, "   ")  # a blank line: skipped, but it still counts in the line numbers that name requests
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    output = tmp_path / "results.jsonl"
    result = run_cli("batch", "--input", str(requests), "--output", str(output), "--model", "tiny", "--frames", "4",
                     "--max-tokens", "3")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["request_id"] for r in records] == ["good", "2", "empty", "text", "6"]
    assert records[0]["error"] is None and len(records[0]["token_ids"]) == 3
    assert "line 2: not a JSON request object" in records[1]["error"]
    assert str(empty) in records[2]["error"]
    assert records[3]["error"] is None and records[4]["error"] is None
    assert all(set(r) == set(records[0]) for r in records), "every line has the same fields"
    assert "3 answered, 2 failed" in result.stderr


def test_batch_with_an_unwritable_output_exits_2_before_any_work(tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"question": "Hello?"}) + "\n")
    for output, message in ((tmp_path / "no-such-dir" / "out.jsonl", "does not exist"),
                            (requests, "it is the input file"), (tmp_path, "it is a directory")):
        result = run_cli("batch", "--input", str(requests), "--output", str(output), "--model", "tiny")
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "answered" not in result.stderr  # nothing ran
    assert json.loads(requests.read_text()) == {"question": "Hello?"}  # the input is untouched


def test_a_batch_that_fails_leaves_an_existing_output_as_it_was(tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"question": "Hello?"}) + "\n")
    output = tmp_path / "out.jsonl"
    output.write_text("OLD RESULTS\n")
    result = run_cli("batch", "--input", str(requests), "--output", str(output), "--model", "tiny",
                     "--device", "cuda:9")
    assert result.returncode == 2 and "cuda:9" in result.stderr
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe not utf-8\n")
    result = run_cli("batch", "--input", str(binary), "--output", str(output), "--model", "tiny")
    assert result.returncode == 2 and "not UTF-8" in result.stderr
    assert output.read_text() == "OLD RESULTS\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dynfocus-")] == []


def test_rejected_requests_keep_their_ids(tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("not json\n" + json.dumps({"question": "q?", "num_frames": 0}) + "\n"
                        + json.dumps({"id": "mine", "question": "q?", "fps": -1}) + "\n")
    output = tmp_path / "out.jsonl"
    result = run_cli("batch", "--input", str(requests), "--output", str(output), "--model", "tiny")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["request_id"] for r in records] == ["1", "2", "mine"]
    assert all(r["error"] for r in records)


@pytest.mark.parametrize("field,value", [("fps", "1"), ("num_frames", 0), ("num_frames", 2.5), ("fps", -1)])
def test_bad_per_request_sampling_is_that_requests_error(tmp_path, video, field, value):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"question": "Q?", "video": video, field: value}) + "\n"
                        + json.dumps({"question": "Fine?"}) + "\n")
    output = tmp_path / "out.jsonl"
    result = run_cli("batch", "--input", str(requests), "--output", str(output), "--model", "tiny", "--max-tokens", "2")
    assert result.returncode == 0, result.stderr
    bad, good = [json.loads(line) for line in output.read_text().splitlines()]
    assert bad["error"].startswith(f"{field} = ") and "internal error" not in bad["error"]
    assert good["error"] is None
