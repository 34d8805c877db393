"""The batch results file: order, whole lines, resume, the lock, file modes, symlinks, standard output."""
import fcntl
import json
import os
import stat

import pytest

from dynfocus_infer.batch_output import ResultWriter
from dynfocus_infer.errors import OutputError


def _record(request_id, error=None):
    return {"request_id": request_id, "text": f"answer {request_id}", "error": error}


def _ids(path):
    return [json.loads(line)["request_id"] for line in path.read_text().splitlines()]


def test_results_are_written_in_order_as_soon_as_they_can_be(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = ResultWriter(str(path))
    writer.put(1, _record("b"))
    assert path.read_text() == ""                       # waits for slot 0
    writer.put(0, _record("a"))
    assert _ids(path) == ["a", "b"]                    # both on disk before close
    writer.put(3, _record("d", error="bad"))
    writer.write_held()                                 # an interrupt: slot 3 out of order, slot 2 never came
    writer.close(complete=False)
    assert _ids(path) == ["a", "b", "d"]
    assert (writer.num_written, writer.num_failed) == (3, 1)


def test_a_slot_given_twice_is_refused(tmp_path):
    writer = ResultWriter(str(tmp_path / "out.jsonl"))
    writer.put(0, _record("a"))
    with pytest.raises(ValueError, match="slot 0"):
        writer.put(0, _record("a"))
    writer.close(complete=True)


def test_old_content_stays_until_the_first_result_and_goes_on_a_complete_run(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("OLD\n")
    interrupted = ResultWriter(str(path))
    interrupted.close(complete=False)                   # interrupted before any result: the old file stays
    assert path.read_text() == "OLD\n"
    empty_run = ResultWriter(str(path))
    empty_run.close(complete=True)                      # a complete run with no requests: an empty output
    assert path.read_text() == ""


def test_an_unfinished_run_removes_the_file_it_created_without_writing(tmp_path):
    path = tmp_path / "new.jsonl"
    ResultWriter(str(path)).close(complete=False)
    assert not path.exists()


def test_resume_reads_done_ids_and_cuts_a_partial_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(_record("a")) + "\n" + json.dumps(_record("b")) + "\n" + '{"request_id": "c", "te')
    writer = ResultWriter(str(path), resume=True)
    assert writer.done_ids == {"a", "b"}
    writer.put(0, _record("c"))
    writer.close(complete=True)
    assert _ids(path) == ["a", "b", "c"]


def test_resume_refuses_a_file_that_is_not_a_results_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("my notes\n")
    with pytest.raises(OutputError, match="line 1 of .*not a dynfocus-infer result line"):
        ResultWriter(str(path), resume=True)
    assert path.read_text() == "my notes\n"


def test_a_second_writer_is_refused_naming_the_output(tmp_path):
    path = tmp_path / "out.jsonl"
    link = tmp_path / "link.jsonl"
    link.symlink_to(path.name)
    first = ResultWriter(str(path))
    for other in (path, link):                          # the same file by another name is the same file
        with pytest.raises(OutputError, match=f"{other.name}.*being written by another dynfocus-infer run"):
            ResultWriter(str(other))
    first.close(complete=True)
    ResultWriter(str(path)).close(complete=True)        # free again once the first run ends


def test_a_lock_held_by_another_process_is_respected(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("")
    with open(path) as handle:                           # a separate open file description, as another process has
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(OutputError, match="being written"):
            ResultWriter(str(path))


def test_file_mode_follows_the_umask_or_the_replaced_file(tmp_path):
    old = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.jsonl"
        writer = ResultWriter(str(fresh))
        writer.put(0, _record("a"))
        writer.close(complete=True)
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        shared = tmp_path / "shared.jsonl"
        shared.write_text("OLD\n")
        shared.chmod(0o664)
        writer = ResultWriter(str(shared))
        writer.put(0, _record("a"))
        writer.close(complete=True)
        assert stat.S_IMODE(shared.stat().st_mode) == 0o664 and _ids(shared) == ["a"]
    finally:
        os.umask(old)


def test_a_symlinked_output_writes_through_to_its_target(tmp_path):
    target = tmp_path / "results" / "real.jsonl"
    target.parent.mkdir()
    target.write_text("OLD\n")
    link = tmp_path / "out.jsonl"
    link.symlink_to(target)
    writer = ResultWriter(str(link))
    writer.put(0, _record("a"))
    writer.close(complete=True)
    assert link.is_symlink() and _ids(target) == ["a"]


def test_dash_writes_to_standard_output(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    writer = ResultWriter("-")
    writer.put(1, _record("b"))
    writer.put(0, _record("a"))
    writer.close(complete=True)
    assert [json.loads(line)["request_id"] for line in capsys.readouterr().out.splitlines()] == ["a", "b"]
    assert not (tmp_path / "-").exists()
    with pytest.raises(OutputError, match="--resume needs an output file"):
        ResultWriter("-", resume=True)
