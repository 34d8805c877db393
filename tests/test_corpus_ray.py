"""Corpus inference through Ray Data on a local Ray sized like a CI runner (2 CPUs, 200 MB object store, no
dashboard), with the tiny preset: rows equal LLM.generate, bad videos are error rows, an interrupted driver then
--resume leaves exactly one row per id without recomputing any, and an answering actor killed mid-job is replaced
with nothing lost or duplicated."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="corpus inference needs the 'distributed' extra (scripts/setup.sh)")
pq = pytest.importorskip("pyarrow.parquet")

from dynfocus_infer.corpus import CorpusJob, run_corpus  # noqa: E402
from dynfocus_infer.corpus.shards import check_complete, list_shards, written_ids  # noqa: E402
from dynfocus_infer.engine import LLM  # noqa: E402
from dynfocus_infer.outputs import Request  # noqa: E402
from dynfocus_infer.sampling import SamplingParams  # noqa: E402
from dynfocus_infer.video import write_test_video  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENGINE_KWARGS = dict(cluster_backend="reference")
NUM_FRAMES = 8
SAMPLING = SamplingParams(max_tokens=6)
NUM_GOOD = 34
BAD_KINDS = ("empty", "truncated", "random", "missing", "audio", "directory")
TOKEN_FIELDS = ("frames", "keyframes", "visual_tokens", "full_visual_tokens", "prompt_tokens", "generated_tokens")


def _job() -> CorpusJob:
    return CorpusJob(model="tiny", engine_kwargs=ENGINE_KWARGS, num_frames=NUM_FRAMES, sampling=SAMPLING)


@pytest.fixture(scope="module")
def ray_address():
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _write_audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for index in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, index * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 rows: 34 small generated videos (some with their own frame count or sampling) and 6 bad ones."""
    root = tmp_path_factory.mktemp("corpus")
    rows = []
    for index in range(NUM_GOOD):
        path = root / f"good{index:02d}.mp4"
        write_test_video(path, num_frames=12 + index % 5 * 6, fps=8, height=48 + index % 2 * 16,
                         width=64 + index % 3 * 16, num_scenes=1 + index % 4)
        row = {"id": f"good{index:02d}", "video": str(path), "question": f"What happens in scene {index}?"}
        if index % 5 == 1:
            row["num_frames"] = 4
        if index % 7 == 2:
            row.update(temperature=0.8, seed=index, max_tokens=4)
        rows.append(row)
    bad = {kind: root / f"bad_{kind}.mp4" for kind in BAD_KINDS}
    bad["empty"].write_bytes(b"")
    whole = (root / "good00.mp4").read_bytes()
    bad["truncated"].write_bytes(whole[: len(whole) // 3])
    bad["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _write_audio_only(bad["audio"])
    bad["directory"] = root / "bad_directory.mp4"
    bad["directory"].mkdir()
    rows += [{"id": f"bad_{kind}", "video": str(path), "question": "What happens?"} for kind, path in bad.items()]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"manifest": str(manifest), "rows": rows, "root": root}


@pytest.fixture(scope="module")
def reference(corpus):
    """LLM.generate on the same 40 requests (paths, per-row frames and sampling), by id."""
    llm = LLM("tiny", num_frames=NUM_FRAMES, **ENGINE_KWARGS)
    requests, params = [], []
    for row in corpus["rows"]:
        requests.append(Request(question=row["question"], video=row["video"], request_id=row["id"],
                                num_frames=row.get("num_frames")))
        overrides = {k: row[k] for k in ("temperature", "seed", "max_tokens") if k in row}
        params.append(SamplingParams(**{**vars(SAMPLING), **overrides}))
    return {output.request_id: output for output in llm.generate(requests, params)}


def _rows_by_id(directory: Path) -> dict:
    rows = [row for name in list_shards(str(directory)) for row in pq.read_table(directory / name).to_pylist()]
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows), "an id has more than one row"
    return by_id


def _assert_rows_equal_reference(rows: dict, reference: dict) -> None:
    assert sorted(rows) == sorted(reference)
    for row_id, expected in reference.items():
        row = rows[row_id]
        assert row["ok"] == expected.ok, (row_id, row["error"], expected.error)
        assert row["error"] == expected.error, row_id
        if expected.ok:
            assert (row["text"], row["token_ids"], row["finish_reason"]) == \
                   (expected.text, expected.token_ids, expected.finish_reason), row_id
            assert {k: row[k] for k in TOKEN_FIELDS} == {k: getattr(expected.tokens, k) for k in TOKEN_FIELDS}, row_id
            assert {"corpus_decode", "vit", "prefill", "decode_steps"} <= set(dict(row["timings_ms"])), row_id


def test_workers_import_this_tree(ray_address):
    @ray.remote(num_cpus=0.5)
    def where():
        import dynfocus_infer
        return dynfocus_infer.__file__

    assert ray.get(where.remote()).startswith(str(ROOT) + os.sep)


def test_rows_equal_llm_generate_and_bad_videos_are_error_rows(ray_address, corpus, reference, tmp_path):
    out = tmp_path / "out"
    summary = run_corpus(corpus["manifest"], str(out), job=_job(), rows_per_shard=8, progress=False)
    assert (summary.total, summary.answered, summary.failed, summary.already_written) == (40, NUM_GOOD, 6, 0)
    assert summary.failures_by_kind == {"video_decode": 6} and summary.duplicates_removed == 0
    assert summary.generated_tokens == sum(len(o.token_ids) for o in reference.values())
    rows = _rows_by_id(out)
    _assert_rows_equal_reference(rows, reference)
    reasons = {"empty": "is empty (0 bytes)", "truncated": "not a readable video",
               "random": "not a readable video", "missing": "no such file", "audio": "has no video stream",
               "directory": "is a directory"}
    for kind, reason in reasons.items():
        row = rows[f"bad_{kind}"]
        assert row["video"] in row["error"] and reason in row["error"], (kind, row["error"])
        assert (row["error_kind"], row["finish_reason"], row["token_ids"]) == ("video_decode", "error", [])
    # Decoding ran in CPU tasks of its own, not inside the engine actor's process.
    decoders = {row["decoded_on"] for row in rows.values()}
    answerers = {row["answered_on"] for row in rows.values()}
    assert None not in decoders | answerers and not decoders & answerers, (decoders, answerers)
    # The folder reads as one Parquet dataset: the settings and summary files are skipped by their `_` prefix.
    assert pq.read_table(out).num_rows == 40
    assert summary.shards == len(list_shards(str(out))) >= 40 // 8


def test_an_interrupted_run_resumes_to_exactly_one_row_per_id(ray_address, corpus, reference, tmp_path):
    out = tmp_path / "out"
    driver = (f"from dynfocus_infer.corpus import CorpusJob, run_corpus\n"
              f"from dynfocus_infer.sampling import SamplingParams\n"
              f"job = CorpusJob(model='tiny', engine_kwargs={ENGINE_KWARGS!r}, num_frames={NUM_FRAMES}, "
              f"sampling=SamplingParams(max_tokens={SAMPLING.max_tokens}))\n"
              f"run_corpus({corpus['manifest']!r}, {str(out)!r}, job=job, address={ray_address!r}, "
              f"batch_size=1, rows_per_shard=2, progress=False)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", driver], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while len(list_shards(str(out))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and anything it started in its own session
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    time.sleep(2)  # Ray ends the dead driver's workers; a shard they finished by then still counts
    before = {name: os.stat(out / name) for name in list_shards(str(out))}
    done_before = written_ids(str(out))
    assert 0 < len(done_before) < 40, f"the driver was not killed part-way ({len(done_before)} rows written)"

    summary = run_corpus(corpus["manifest"], str(out), job=_job(), resume=True, batch_size=4, rows_per_shard=4,
                         progress=False)
    assert summary.already_written == len(done_before)
    assert summary.processed == 40 - len(done_before), "finished ids were answered again"
    for name, stat in before.items():  # the first run's shards are kept as they were
        assert os.stat(out / name).st_ino == stat.st_ino and os.stat(out / name).st_mtime_ns == stat.st_mtime_ns
    assert not [name for name in os.listdir(out) if name.startswith(".tmp-")]
    assert check_complete(str(out), reference) == {row_id: 1 for row_id in reference}
    _assert_rows_equal_reference(_rows_by_id(out), reference)
    again = run_corpus(corpus["manifest"], str(out), job=_job(), resume=True, progress=False)
    assert (again.already_written, again.processed) == (40, 0)


def test_a_killed_answering_actor_is_replaced_and_no_row_is_lost(ray_address, corpus, reference, tmp_path):
    out = tmp_path / "out"
    result: dict = {}

    def run():
        try:
            result["summary"] = run_corpus(corpus["manifest"], str(out), job=_job(), batch_size=1, rows_per_shard=2,
                                           progress=False)
        except BaseException as error:  # handed to the test's thread
            result["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 180
    while not list_shards(str(out)) and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    first = list_shards(str(out))
    assert first, "no shard was written"
    victim = pq.read_table(out / first[0]).column("answered_on")[0].as_py()
    shards_at_kill = len(list_shards(str(out)))
    os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
    worker.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not worker.is_alive(), "the job did not finish in time after its actor was killed"
    assert "error" not in result, repr(result.get("error"))
    summary = result["summary"]
    assert shards_at_kill < summary.shards, "the actor was killed after the last shard: nothing was left to retry"
    assert (summary.answered, summary.failed, summary.duplicates_removed) == (NUM_GOOD, 6, 0)
    assert check_complete(str(out), reference) == {row_id: 1 for row_id in reference}
    rows = _rows_by_id(out)
    _assert_rows_equal_reference(rows, reference)
    answerers = {row["answered_on"] for row in rows.values()}
    assert victim in answerers and len(answerers) == 2, f"the killed actor was not replaced mid-job: {answerers}"


def test_cli_writes_jsonl_shards_prints_the_summary_and_resumes(ray_address, corpus, tmp_path, capsys):
    from dynfocus_infer import cli

    rows = corpus["rows"][:3] + [row for row in corpus["rows"] if row["id"] == "bad_missing"]
    manifest = tmp_path / "small.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    args = ["corpus", "--input", str(manifest), "--output", str(out), "--format", "jsonl", "--model", "tiny",
            "--frames", str(NUM_FRAMES), "--max-tokens", "3", "--no-progress"]
    assert cli.main(args) == cli.EXIT_OK
    err = capsys.readouterr().err
    lines = [json.loads(line) for name in list_shards(str(out)) for line in (out / name).read_text().splitlines()]
    failed = {line["id"]: line["error"] for line in lines if not line["ok"]}
    assert list(failed) == ["bad_missing"], failed
    assert "4 rows this run (3 answered, 1 failed), 0 already written, 4 in the manifest" in err, err[-600:]
    assert "failures by kind (whole output): video_decode 1" in err and str(out) in err
    assert sorted(line["id"] for line in lines) == sorted(row["id"] for row in rows)
    max_tokens = {row["id"]: row.get("max_tokens", 3) for row in rows}  # --max-tokens unless the row says
    assert all(len(line["token_ids"]) == max_tokens[line["id"]] for line in lines if line["ok"]), lines
    assert cli.main(args) == cli.EXIT_BAD_INPUT  # the folder holds shards: --resume or another folder
    assert "pass --resume" in capsys.readouterr().err
    assert cli.main(args + ["--resume"]) == cli.EXIT_OK
    assert "0 rows this run (0 answered, 0 failed), 4 already written" in capsys.readouterr().err


def test_a_focus_job_through_ray_equals_llm_generate_with_focus(ray_address, corpus, tmp_path, capsys):
    """A focus job: the engines read each file themselves (dense frames by index), the rows equal LLM.generate with
    focus on the same paths, each with its focus as JSON; a bad file is still a video_decode row. `corpus --focus`
    writes focus rows and records the focus, and resuming with another focus is refused."""
    from dynfocus_infer import cli

    rows = corpus["rows"][:4] + [row for row in corpus["rows"] if row["id"] in ("bad_missing", "bad_random")]
    manifest = tmp_path / "focus.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    llm = LLM("tiny", num_frames=NUM_FRAMES, **ENGINE_KWARGS)
    reference = {row["id"]: llm.generate([Request(question=row["question"], video=row["video"], focus="llm",
                                                  num_frames=row.get("num_frames"))],
                                         SamplingParams(**{**vars(SAMPLING), "max_tokens": 3, **{
                                             k: row[k] for k in ("temperature", "seed", "max_tokens") if k in row}}))[0]
                 for row in rows}
    out = tmp_path / "out"
    job = CorpusJob(model="tiny", engine_kwargs=ENGINE_KWARGS, num_frames=NUM_FRAMES,
                    sampling=SamplingParams(**{**vars(SAMPLING), "max_tokens": 3}), focus="llm")
    run_corpus(str(manifest), str(out), job=job, progress=False)
    got = _rows_by_id(out)
    assert sorted(got) == sorted(reference)
    for row_id, want in reference.items():
        row = got[row_id]
        assert (row["ok"], row["token_ids"]) == (want.ok, want.token_ids), (row_id, row["error"], want.error)
        if want.ok:
            assert json.loads(row["focus"]) == want.focus.to_dict() and row["prompt_tokens"] == want.tokens.prompt_tokens
        else:
            assert row["error_kind"] == "video_decode" and row["video"] in row["error"], row
    # The command line: --focus reaches the rows and the folder's settings; another focus cannot resume it.
    small = tmp_path / "one.jsonl"
    small.write_text(json.dumps(rows[0]) + "\n")
    args = ["corpus", "--input", str(small), "--output", str(tmp_path / "cli"), "--model", "tiny", "--frames",
            str(NUM_FRAMES), "--max-tokens", "3", "--no-progress", "--focus", "llm"]
    assert cli.main(args) == cli.EXIT_OK, capsys.readouterr().err[-800:]
    (row,) = _rows_by_id(tmp_path / "cli").values()
    assert json.loads(row["focus"])["mode"] == "llm"
    assert json.loads((tmp_path / "cli" / "_corpus.json").read_text())["focus"] == "llm"
    assert cli.main(args[:-2] + ["--focus", "dpe", "--resume"]) == cli.EXIT_BAD_INPUT
    assert "focus" in capsys.readouterr().err.split("other settings (")[1].split(":")[0]
