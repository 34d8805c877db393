"""Corpus inference without Ray: the manifest check, shards on disk, the output folder, the decode stage, the CLI,
and the package importing on a machine without the `distributed` extra. Ray itself: tests/test_corpus_ray.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="corpus inference needs the 'distributed' extra (scripts/setup.sh)")
pq = pytest.importorskip("pyarrow.parquet")

from dynfocus_infer import cli  # noqa: E402
from dynfocus_infer.corpus import CorpusError, CorpusJob  # noqa: E402
from dynfocus_infer.corpus import shards as shards_module  # noqa: E402
from dynfocus_infer.corpus.job import SETTINGS_FILE, prepare_output  # noqa: E402
from dynfocus_infer.corpus.manifest import read_manifest, sampling_for  # noqa: E402
from dynfocus_infer.corpus.pipeline import _actor_pool_size  # noqa: E402
from dynfocus_infer.corpus.shards import (  # noqa: E402
    OUTPUT_SCHEMA, check_complete, deduplicate, list_shards, read_shard, remove_temp_files, shard_name, write_shard,
    written_ids)
from dynfocus_infer.corpus.stages import MANIFEST_SCHEMA, decode_batch  # noqa: E402
from dynfocus_infer.errors import ConfigError  # noqa: E402
from dynfocus_infer.sampling import SamplingParams  # noqa: E402
from dynfocus_infer.video import decode_video, write_test_video  # noqa: E402
from dynfocus_infer.video_decode import video_path_problem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def _rows(ids, ok=True) -> pa.Table:
    rows = [{"id": i, "video": f"{i}.mp4", "question": "q?", "ok": ok, "text": f"answer {i}", "token_ids": [1, 2],
             "finish_reason": "stop" if ok else "error", "error": None if ok else f"{i}.mp4: broken",
             "error_kind": None if ok else "video_decode", "frames": 8, "keyframes": 2, "visual_tokens": 40,
             "full_visual_tokens": 512, "prompt_tokens": 60, "generated_tokens": 2,
             "timings_ms": [("vit", 1.5)], "notice": None} for i in ids]
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


# -- manifest ----------------------------------------------------------------------------------------------------

def test_manifest_rows_get_every_field_string_ids_and_full_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _jsonl(tmp_path / "m.jsonl", [{"id": 7, "video": "videos/a.mp4", "question": "What?"}, "",
                                          {"id": "b", "video": "/data/b.mp4", "question": "Who?", "num_frames": 4,
                                           "temperature": 0.5, "seed": 3}])
    rows = read_manifest(path)
    assert [r["id"] for r in rows] == ["7", "b"]
    assert [r["video"] for r in rows] == [str(tmp_path / "videos" / "a.mp4"), "/data/b.mp4"]
    assert rows[0]["num_frames"] is None and rows[1]["num_frames"] == 4
    params = sampling_for(rows[1], SamplingParams(max_tokens=9))
    assert (params.max_tokens, params.temperature, params.seed) == (9, 0.5, 3)


def test_parquet_manifest_reads_like_jsonl(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "video": ["x.mp4", "y.mp4"], "question": ["a?", "b?"],
                             "max_tokens": [3, None]}), path)
    rows = read_manifest(str(path))
    assert [(r["id"], r["max_tokens"]) for r in rows] == [("x", 3), ("y", None)]


@pytest.mark.parametrize("rows, match", [
    ([{"id": "a", "video": "v", "question": "q"}, {"id": "a", "video": "w", "question": "r"}],
     r"1 id\(s\) appear more than once \('a'\)"),
    ([{"id": "a", "video": "v"}], r"line 1: 'question' must be a non-empty string"),
    ([{"id": "a", "video": "v", "question": "q", "answer": "B"}], r"unknown field\(s\) \['answer'\]"),
    ([{"id": 1.5, "video": "v", "question": "q"}], r"'id' must be a non-empty string, got 1.5"),
    ([{"id": "a", "video": "v", "question": "q", "num_frames": 2.5}], r"'num_frames' must be an integer"),
    ([{"id": "a", "video": "v", "question": "q", "fps": 1.0, "num_frames": 4}], r"not both"),
    ([{"id": "a", "video": "v", "question": "q", "max_frames": 4}], r"max_frames only goes with fps"),
    ([{"id": "a", "video": "v", "question": "q", "temperature": -1}], r"SamplingParams.temperature"),
    ([{"id": "a", "video": "v", "question": "look at <image>"}], r"may not contain <image>"),
    (["[1, 2]"], r"line 1: expected a JSON object"),
    (["{not json"], r"line 1: not JSON"),
    ([], r"holds no rows"),
])
def test_bad_manifests_fail_before_any_work_naming_the_row(tmp_path, rows, match):
    with pytest.raises(CorpusError, match=match):
        read_manifest(_jsonl(tmp_path / "m.jsonl", rows))


# -- shards ------------------------------------------------------------------------------------------------------

def test_shard_name_depends_on_the_ids_not_their_order():
    assert shard_name(["b", "a"], "parquet") == shard_name(["a", "b"], "parquet")
    assert shard_name(["a", "b"], "parquet") != shard_name(["a", "c"], "parquet")
    assert shard_name(["a"], "jsonl").startswith("shard-") and shard_name(["a"], "jsonl").endswith(".jsonl")


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_shards_round_trip_in_both_formats(tmp_path, fmt):
    name = write_shard(_rows(["a", "b"]), str(tmp_path), fmt)
    assert list_shards(str(tmp_path)) == [name] and os.listdir(tmp_path) == [name]
    table = read_shard(str(tmp_path / name))
    assert table.column("id").to_pylist() == ["a", "b"]
    assert table.column("text").to_pylist() == ["answer a", "answer b"]
    assert table.column("token_ids").to_pylist() == [[1, 2], [1, 2]]
    assert table.column("timings_ms").to_pylist()[0] == [("vit", 1.5)]


def test_a_failed_shard_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def write_half_then_fail(table, path):
        Path(path).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(shards_module.pq, "write_table", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_shard(_rows(["a"]), str(tmp_path), "parquet")
    assert os.listdir(tmp_path) == []


def test_temp_files_of_killed_writes_are_not_shards_and_get_removed(tmp_path):
    (tmp_path / ".tmp-123-shard-abc.parquet").write_bytes(b"PAR1 half")
    write_shard(_rows(["a"]), str(tmp_path), "parquet")
    assert written_ids(str(tmp_path)) == {"a": shard_name(["a"], "parquet")}
    assert remove_temp_files(str(tmp_path)) == 1
    assert list_shards(str(tmp_path)) == sorted(os.listdir(tmp_path))


def test_deduplicate_keeps_each_id_once_and_every_row(tmp_path):
    directory = str(tmp_path)
    write_shard(_rows(["a", "b"]), directory, "parquet")
    write_shard(_rows(["b", "c"]), directory, "parquet")
    write_shard(_rows(["c"]), directory, "parquet")
    assert deduplicate(directory, "parquet") == 2
    counts = check_complete(directory, ["a", "b", "c"])
    assert counts == {"a": 1, "b": 1, "c": 1}
    assert deduplicate(directory, "parquet") == 0


def test_check_complete_names_missing_extra_and_repeated_ids(tmp_path):
    directory = str(tmp_path)
    write_shard(_rows(["a", "b"]), directory, "parquet")
    write_shard(_rows(["b", "z"]), directory, "parquet")
    with pytest.raises(CorpusError, match=r"1 missing \['c'\], 1 not in the manifest \['z'\], 1 repeated \['b'\]"):
        check_complete(directory, ["a", "b", "c"])


# -- output folder -----------------------------------------------------------------------------------------------

def test_output_folder_needs_resume_same_settings_and_the_same_manifest(tmp_path):
    directory = str(tmp_path / "out")
    job = CorpusJob(model="tiny", num_frames=8)
    assert prepare_output(directory, job, ["a", "b"], resume=False) == {}
    assert json.loads((tmp_path / "out" / SETTINGS_FILE).read_text())["model"] == "tiny"
    write_shard(_rows(["a"]), directory, "parquet")
    with pytest.raises(CorpusError, match="already holds 1 shard"):
        prepare_output(directory, job, ["a", "b"], resume=False)
    with pytest.raises(CorpusError, match=r"other settings \(frame_sampling"):
        prepare_output(directory, CorpusJob(model="tiny", num_frames=4), ["a", "b"], resume=True)
    with pytest.raises(CorpusError, match=r"1 id\(s\) that are not in the manifest \(\['a'\]\)"):
        prepare_output(directory, job, ["b", "c"], resume=True)
    assert prepare_output(directory, job, ["a", "b"], resume=True) == {"a": shard_name(["a"], "parquet")}
    faster = CorpusJob(model="tiny", num_frames=8, engine_kwargs=dict(max_batch_size=32))
    assert prepare_output(directory, faster, ["a", "b"], resume=True) == {"a": shard_name(["a"], "parquet")}
    with pytest.raises(CorpusError, match=r"other settings \(engine_kwargs"):
        prepare_output(directory, CorpusJob(model="tiny", num_frames=8, engine_kwargs=dict(device="cpu")),
                       ["a", "b"], resume=True)


def test_job_settings_are_checked():
    with pytest.raises(CorpusError, match="needs max_frames"):
        CorpusJob(fps=1.0)
    with pytest.raises(ConfigError, match="corpus frame sampling"):
        CorpusJob(num_frames=0)
    with pytest.raises(CorpusError, match="output format 'csv' is unknown"):
        CorpusJob(output_format="csv")
    # The model's default frames (presets.default_frames): 12 for dynfocus-smol, as trained; 16 for the others.
    with pytest.raises(ConfigError, match="corpus focus = 'sideways' is invalid"):
        CorpusJob(focus="sideways")
    assert not CorpusJob().decode_in_engine and "focus" not in CorpusJob().settings()
    assert CorpusJob(focus="llm").decode_in_engine and CorpusJob(focus="dpe").settings()["focus"] == "dpe"
    assert CorpusJob(model="slowfocus-tiny").decode_in_engine
    for bad in (dict(model="slowfocus-tiny"), dict(engine_kwargs=dict(visual_encoder="pool-4x4"))):
        with pytest.raises(ConfigError, match="focus = 'dpe' needs a DynFocus model"):
            CorpusJob(focus="dpe", **bad)


def test_a_row_asking_another_fps_cap_of_an_engine_decoding_job_is_refused_before_any_work(tmp_path):
    from dynfocus_infer.corpus import run_corpus

    video = tmp_path / "v.mp4"
    write_test_video(video, num_frames=8, fps=8, height=48, width=64)
    manifest = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "video": str(video), "question": "q", "fps": 1.0,
                                              "max_frames": 3}])
    job = CorpusJob(model="tiny", fps=2.0, max_frames=8, focus="llm")
    with pytest.raises(CorpusError, match="row 'a': max_frames = 3, but this job's engines decode"):
        run_corpus(manifest, str(tmp_path / "out"), job=job)
    assert not (tmp_path / "out").exists()
    assert CorpusJob().frame_sampling == dict(num_frames=12, fps=None, max_frames=None)
    assert CorpusJob(model="dynfocus-smol-random").frame_sampling == dict(num_frames=16, fps=None, max_frames=None)


@pytest.mark.parametrize("resources, num_gpus, concurrency, expected", [
    ({"CPU": 2}, None, None, (1, 0)),
    ({"CPU": 2}, 0, 3, (3, 0)),
    ({"CPU": 8, "GPU": 4}, None, None, (4, 1.0)),
    ({"CPU": 8, "GPU": 4}, 2, 4, (4, 0.5)),
])
def test_one_engine_per_gpu_by_default_and_cpu_engines_without(resources, num_gpus, concurrency, expected):
    assert _actor_pool_size(resources, num_gpus, concurrency, local=True) == expected


@pytest.mark.parametrize("num_gpus, concurrency, error, match", [
    (1, None, CorpusError, "sees 0 GPU"),
    (-1, None, ConfigError, "num_gpus = -1"),
])
def test_bad_pool_sizes_are_errors(num_gpus, concurrency, error, match):
    with pytest.raises(error, match=match):
        _actor_pool_size({"CPU": 2}, num_gpus, concurrency, local=True)
    with pytest.raises(ConfigError, match="a multiple of num_gpus"):
        _actor_pool_size({"GPU": 2}, 2, 3, local=True)


# -- decode stage ------------------------------------------------------------------------------------------------

def test_decode_stage_samples_the_frames_decode_video_does(tmp_path):
    video = tmp_path / "v.mp4"
    write_test_video(video, num_frames=30, fps=10, height=48, width=64)
    rows = [{"id": "job", "video": str(video), "question": "q"},
            {"id": "row", "video": str(video), "question": "q", "num_frames": 5},
            {"id": "fps", "video": str(video), "question": "q", "fps": 2.0, "max_frames": 4},
            {"id": "gone", "video": str(tmp_path / "gone.mp4"), "question": "q"},
            {"id": "dir", "video": str(tmp_path), "question": "q"}]
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    out = decode_batch(table, frame_sampling=dict(num_frames=8, fps=None, max_frames=None), backend="auto",
                       timeout_s=30.0).to_pylist()
    expected = [decode_video(str(video), num_frames=8), decode_video(str(video), num_frames=5),
                decode_video(str(video), fps=2.0, max_frames=4)]
    for row, decoded in zip(out, expected):
        frames = np.frombuffer(row["frames"], np.uint8).reshape(row["frames_shape"])
        assert np.array_equal(frames, decoded.frames.numpy()) and row["decode_error"] is None
    assert [r["frames_shape"][0] for r in out[:3]] == [8, 5, 4]
    # the same messages as decode_video's own path checks
    assert out[3]["decode_error"] == f"{tmp_path / 'gone.mp4'}: {video_path_problem(str(tmp_path / 'gone.mp4'))}"
    assert out[4]["decode_error"] == f"{tmp_path}: {video_path_problem(str(tmp_path))}"
    assert "no such file" in out[3]["decode_error"] and "directory" in out[4]["decode_error"]
    assert [r["decode_error_kind"] for r in out[3:]] == ["video_decode", "video_decode"]


def _decoded_table(rows, **kwargs):
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    return decode_batch(table, frame_sampling=dict(num_frames=6, fps=None, max_frames=None), backend="auto",
                        timeout_s=30.0, **kwargs)


def test_a_job_whose_engine_decodes_sends_paths_and_checks_files_only(tmp_path):
    video = tmp_path / "v.mp4"
    write_test_video(video, num_frames=30, fps=10, height=48, width=64)
    out = _decoded_table([{"id": "ok", "video": str(video), "question": "q"},
                          {"id": "gone", "video": str(tmp_path / "gone.mp4"), "question": "q"}],
                         in_engine=True).to_pylist()
    assert out[0]["frames"] is None and out[0]["decode_error"] is None and out[0]["decoded_on"]
    assert out[1]["decode_error"] == f"{tmp_path / 'gone.mp4'}: {video_path_problem(str(tmp_path / 'gone.mp4'))}"
    assert out[1]["decode_error_kind"] == "video_decode"


@pytest.mark.parametrize("model, focus", [("tiny", "llm"), ("tiny", "dpe"), ("slowfocus-tiny", None),
                                          ("slowfocus-tiny", "llm")])
def test_engine_decoding_rows_equal_llm_generate_on_the_path(tmp_path, monkeypatch, model, focus):
    """The answering stage of a focus job or a SlowFocus model (run here without Ray): each row is what
    LLM.generate gives the same request on the file (focus included), bad rows fail alone with their kind."""
    from dynfocus_infer.core.focus_stage import FocusStage
    from dynfocus_infer.corpus.stages import Answerer
    from dynfocus_infer.engine import LLM
    from dynfocus_infer.outputs import Request

    monkeypatch.setattr(FocusStage, "_grounding_text", staticmethod(lambda state: "from 20 to 50"))
    video = tmp_path / "v.mp4"
    write_test_video(video, num_frames=40, fps=8, height=48, width=64)
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    rows = [{"id": "a", "video": str(video), "question": "What happens?"},
            {"id": "b", "video": str(video), "question": "What moves?", "num_frames": 4},
            {"id": "fps", "video": str(video), "question": "Why?", "fps": 2.0, "max_frames": 3},
            {"id": "noise", "video": str(tmp_path / "noise.mp4"), "question": "What happens?"},
            {"id": "gone", "video": str(tmp_path / "gone.mp4"), "question": "What happens?"}]
    job = CorpusJob(model=model, engine_kwargs=dict(cluster_backend="reference"), num_frames=6,
                    sampling=SamplingParams(max_tokens=3), focus=focus)
    answerer = Answerer(job.model, job.engine_arguments(), job.sampling, focus=job.focus,
                        frame_sampling=job.frame_sampling)
    if model == "slowfocus-tiny":   # frames without their source times would be wrong: refused
        with pytest.raises(CorpusError, match="is a SlowFocus model, but the job sends sampled frames"):
            Answerer(job.model, job.engine_arguments(), job.sampling)
    got = {row["id"]: row for row in answerer(_decoded_table(rows, in_engine=True)).to_pylist()}
    llm = LLM(model, num_frames=6, cluster_backend="reference")
    for row_id, frames in (("a", None), ("b", 4)):
        want = llm.generate([Request(rows[0 if row_id == "a" else 1]["question"], str(video), num_frames=frames,
                                     focus=focus)], SamplingParams(max_tokens=3))[0]
        assert got[row_id]["ok"] and got[row_id]["token_ids"] == want.token_ids, got[row_id]["error"]
        assert got[row_id]["visual_tokens"] == want.tokens.visual_tokens
        assert (json.loads(got[row_id]["focus"]) if focus else None) == (want.focus and want.focus.to_dict())
    assert not got["fps"]["ok"] and got["fps"]["error_kind"] == "request" and "max_frames" in got["fps"]["error"]
    assert (got["noise"]["ok"], got["noise"]["error_kind"]) == (False, "video_decode")
    assert (got["gone"]["error_kind"], got["gone"]["focus"]) == ("video_decode", None)


# -- CLI and imports ---------------------------------------------------------------------------------------------

def test_cli_rejects_a_bad_manifest_before_creating_anything(tmp_path, capsys):
    manifest = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "video": "v", "question": "q"}] * 2)
    code = cli.main(["corpus", "--input", manifest, "--output", str(tmp_path / "out"), "--model", "tiny"])
    assert code == cli.EXIT_BAD_INPUT
    assert "appear more than once ('a')" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    code = cli.main(["corpus", "--input", manifest, "--output", str(tmp_path / "out"), "--model", "no-such-model"])
    assert code == cli.EXIT_BAD_INPUT
    assert "model 'no-such-model' is neither a preset" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


BLOCK_RAY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "pyarrow"):
            raise ImportError(f"{name} is blocked for this test")
sys.meta_path.insert(0, Block())
"""


def test_the_package_and_cli_import_without_ray_and_corpus_says_what_to_install(tmp_path):
    script = BLOCK_RAY + f"""
import dynfocus_infer, dynfocus_infer.cli, dynfocus_infer.engine, dynfocus_infer.corpus
assert "ray" not in sys.modules and "pyarrow" not in sys.modules
code = dynfocus_infer.cli.main(["corpus", "--input", {str(tmp_path / 'm.jsonl')!r}, "--output", "out"])
print("exit", code)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("exit 2")
    assert "pip install 'dynfocus-infer[distributed]'" in done.stderr


class _Stop(Exception):
    pass


@pytest.mark.parametrize("address, expected", [(None, dict(address="local", include_dashboard=False, num_cpus=1)),
                                               ("auto", dict(address="auto", num_cpus=1))])
def test_no_address_starts_a_new_local_ray_never_a_recorded_cluster(tmp_path, monkeypatch, address, expected):
    ray = pytest.importorskip("ray")
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        raise _Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    manifest = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "video": "a.mp4", "question": "q?"}])
    from dynfocus_infer.corpus import run_corpus

    with pytest.raises(_Stop):
        run_corpus(manifest, str(tmp_path / "out"), job=CorpusJob(model="tiny"), address=address,
                   ray_init_kwargs=dict(num_cpus=1))
    assert calls == [expected]
