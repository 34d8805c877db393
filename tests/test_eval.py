"""`dynfocus-infer eval`: the scoring rules on hand-made predictions, and the engine end to end on a few held-out
videos with the random tiny model (its accuracy means nothing; the plumbing and the files are checked)."""
import csv
import json

import pytest

from dynfocus_infer.cli import main
from dynfocus_infer.evaluation import accuracy_by_type, answer_blind, confusion, evaluate, is_correct, normalise
from dynfocus_infer.synthetic import write_dataset

SHAPES = [{"colour": "red", "kind": "circle"}, {"colour": "blue", "kind": "square"}]


def test_single_word_answers_match_after_normalising():
    assert normalise("  Red.\n") == "red"
    assert is_correct("colour", "Red.", "red")
    assert is_correct("direction", "It does not move.", "it does not move")
    assert is_correct("count", "two", "two")
    assert not is_correct("colour", "The red one", "red")
    assert not is_correct("count", "2", "two")
    assert not is_correct("shape", "circles", "circle")


def test_describe_needs_every_shape_by_colour_and_shape():
    assert is_correct("describe", "A red circle moves left. A blue square does not move.", "", SHAPES)
    assert is_correct("describe", "a BLUE square, and a red circle", "", SHAPES)
    assert not is_correct("describe", "A red circle moves left.", "", SHAPES)
    assert not is_correct("describe", "A red square and a blue circle.", "", SHAPES)
    assert not is_correct("describe", "A red circles and a blue square.", "", SHAPES)
    with pytest.raises(ValueError):
        is_correct("describe", "A red circle.", "")


def test_accuracy_by_type_counts_each_type_and_all():
    rows = [{"type": "colour", "correct": True}, {"type": "colour", "correct": False},
            {"type": "describe", "correct": True}]
    table = accuracy_by_type(rows)
    assert list(table) == ["colour", "describe", "all"]
    assert table["colour"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert table["all"]["accuracy"] == pytest.approx(2 / 3)


def _row(kind, answer, prediction):
    return {"type": kind, "answer": answer, "prediction": prediction, "correct": normalise(prediction) == answer}


def test_answer_blind_is_the_accuracy_of_answering_as_often_without_the_video():
    # a model that always says "square": right on a third of the questions, exactly as often as blind guessing
    always = [_row("shape", a, "Square.") for a in ("circle", "square", "triangle")]
    assert answer_blind(always) == {"shape": pytest.approx(1 / 3)}
    assert accuracy_by_type(always)["shape"]["accuracy"] == pytest.approx(1 / 3)
    # a model that reads the video: 100% against sum(p^2) = (3/4)^2 + (1/4)^2 for a skewed answer distribution
    reads = [_row("direction", a, a) for a in ("it does not move",) * 3 + ("left",)]
    assert answer_blind(reads)["direction"] == pytest.approx(0.625)
    # per type; describe has no single expected answer; predictions outside the answers count for nothing
    mixed = reads + always + [_row("describe", "A red circle.", "A red circle."), _row("count", "two", "2")]
    blind = answer_blind(mixed)
    assert set(blind) == {"direction", "shape", "count"} and blind["count"] == 0.0


def test_confusion_counts_answer_prediction_pairs_per_type():
    rows = [_row("colour", "red", "Red"), _row("colour", "red", "blue"), _row("colour", "red", "red."),
            _row("colour", "blue", "the blue one"), _row("describe", "A red circle.", "A red circle."),
            _row("count", "one", "one"), _row("shape", "circle", "square"), _row("shape", "square", "circle")]
    got = confusion(rows)
    assert got == [{"type": "colour", "answer": "blue", "prediction": "(other)", "count": 1},
                   {"type": "colour", "answer": "red", "prediction": "red", "count": 2},
                   {"type": "colour", "answer": "red", "prediction": "blue", "count": 1},
                   {"type": "shape", "answer": "circle", "prediction": "square", "count": 1},
                   {"type": "shape", "answer": "square", "prediction": "circle", "count": 1},
                   {"type": "count", "answer": "one", "prediction": "one", "count": 1}]
    assert sum(r["count"] for r in got) == len(rows) - 1


def test_eval_runs_the_engine_per_encoder_and_scores_its_answers(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, 2, seed=5)
    table = evaluate(tmp_path / "out", model="tiny", encoders=["dynfocus", "pool-4x4"], data=str(data),
                     num_frames=4, max_tokens=4, max_questions=6)
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 12 and {p["encoder"] for p in predictions} == {"dynfocus", "pool-4x4"}
    assert all(p["error"] is None and p["visual_tokens"] > 0 for p in predictions)
    scenes = {s["video"]: s for s in map(json.loads, (data / "scenes.jsonl").read_text().splitlines())}
    for p in predictions:  # the file's verdicts are the scoring rules applied to the engine's text
        shapes = scenes[p["video"]]["shapes"]
        expected = (all(f"{s['colour']} {s['kind']}" in normalise(p["prediction"]) for s in shapes)
                    if p["type"] == "describe" else normalise(p["prediction"]) == normalise(p["answer"]))
        assert p["correct"] == expected, p
    tokens = {r["encoder"]: r["visual_tokens"] for r in table}
    assert tokens["dynfocus"] != tokens["pool-4x4"]
    rows = list(csv.DictReader(open(tmp_path / "out" / "accuracy.csv")))
    assert {(r["encoder"], r["type"]) for r in rows} >= {("dynfocus", "all"), ("pool-4x4", "all")}
    overall = [r for r in rows if r["type"] == "all" and r["encoder"] == "dynfocus"][0]
    assert int(overall["total"]) == 6
    assert int(overall["correct"]) == sum(p["correct"] for p in predictions if p["encoder"] == "dynfocus")
    assert int(overall["videos"]) == len({p["video"] for p in predictions if p["encoder"] == "dynfocus"})
    assert (tmp_path / "out" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for encoder in ("dynfocus", "pool-4x4"):  # blind accuracy and the confusion counts follow from the predictions
        mine = [p for p in predictions if p["encoder"] == encoder]
        blind = answer_blind(mine)
        for row in (r for r in rows if r["encoder"] == encoder):
            assert row["blind"] == (str(round(blind[row["type"]], 4)) if row["type"] in blind else ""), row
        counted = [r for r in csv.DictReader(open(tmp_path / "out" / "confusion.csv")) if r["encoder"] == encoder]
        assert sum(int(r["count"]) for r in counted) == sum(p["type"] != "describe" for p in mine)
        assert counted == [{"encoder": encoder, **{k: str(v) for k, v in r.items()}} for r in confusion(mine)]


def test_eval_keeps_the_questions_of_the_first_videos(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, 3, seed=6)
    questions = [json.loads(line) for line in (data / "qa.jsonl").read_text().splitlines()]
    first_two = {q["video"] for q in questions[:1]} | {next(q["video"] for q in questions
                                                            if q["video"] != questions[0]["video"])}
    table = evaluate(tmp_path / "out", model="tiny", encoders=["dynfocus-rods-off"], data=str(data), num_frames=4,
                     max_tokens=2, max_videos=2)
    overall = [r for r in table if r["type"] == "all"][0]
    assert overall["videos"] == 2 and overall["total"] == sum(q["video"] in first_two for q in questions)


def test_eval_keeps_the_encoders_that_finished_when_a_later_one_fails(tmp_path):
    from dynfocus_infer.engine import LLM

    data = tmp_path / "data"
    write_dataset(data, 2, seed=7)

    def factory(encoder):
        if encoder == "pool-4x4":
            raise KeyboardInterrupt  # as Ctrl-C during the second encoder would
        return LLM("tiny", visual_encoder=encoder, num_frames=4, device="cpu")

    with pytest.raises(KeyboardInterrupt):
        evaluate(tmp_path / "out", model="tiny", encoders=["dynfocus", "pool-4x4"], data=str(data), max_tokens=2,
                 max_questions=3, llm_factory=factory)
    written = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(written) == 3 and {p["encoder"] for p in written} == {"dynfocus"}
    rows = list(csv.DictReader(open(tmp_path / "out" / "accuracy.csv")))
    assert {r["encoder"] for r in rows} == {"dynfocus"} and any(r["type"] == "all" for r in rows)
    assert json.loads((tmp_path / "out" / "accuracy.json").read_text()) == [
        {**r, "correct": int(r["correct"]), "total": int(r["total"]), "accuracy": float(r["accuracy"]),
         "visual_tokens": float(r["visual_tokens"]), "videos": int(r["videos"]),
         "blind": float(r["blind"]) if r["blind"] else ""} for r in rows]
    assert not list((tmp_path / "out").glob("*.partial"))


def test_eval_command_rejects_bad_input_and_a_training_seed(tmp_path, capsys):
    assert main(["eval", "--out", str(tmp_path / "e"), "--count", "0"]) == 2
    assert main(["eval", "--out", str(tmp_path / "e"), "--data", str(tmp_path / "missing"), "--model", "tiny"]) == 2
    assert "holds no qa.jsonl" in capsys.readouterr().err
    weights = tmp_path / "w" / "visual.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"x")
    (weights.parent / "visual_config.json").write_text(json.dumps({"training": {"seed": 3}}))
    assert main(["eval", "--out", str(tmp_path / "e"), "--weights", str(weights), "--seed", "3"]) == 2
    assert "trained on" in capsys.readouterr().err


def test_eval_table_merges_runs_into_one_row_per_encoder(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from eval_table import main as eval_table_main, markdown, read_rows

    for name, encoder, correct in (("a", "dynfocus", 9), ("b", "full", 4)):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "accuracy.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["encoder", "type", "correct", "total", "accuracy",
                                                        "visual_tokens", "videos"])
            writer.writeheader()
            for kind in ("colour", "all"):
                writer.writerow({"encoder": encoder, "type": kind, "correct": correct, "total": 10,
                                 "accuracy": correct / 10, "visual_tokens": 48.0 if encoder == "dynfocus" else 768.0,
                                 "videos": 5})
    (tmp_path / "c").mkdir()  # a run of this version: the same encoder, scored with weights trained for its layout
    with open(tmp_path / "c" / "accuracy.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["encoder", "type", "correct", "total", "accuracy",
                                                    "visual_tokens", "videos", "trained_for", "trained_steps"])
        writer.writeheader()
        writer.writerow({"encoder": "full", "type": "all", "correct": 7, "total": 10, "accuracy": 0.7,
                         "visual_tokens": 768.0, "videos": 5, "trained_for": "full", "trained_steps": 300})
    rows = read_rows([tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    table = markdown(rows).splitlines()
    assert len(table) == 5 and table[2].startswith("| dynfocus | - | 48 | 5 | 90% (9/10) | - |")
    assert table[3].startswith("| full | - | 768 | 5 | 40% (4/10) |") and table[3].endswith("| 40% (4/10) |")
    assert table[4].startswith("| full | full (300) | 768 | 5 | - |") and table[4].endswith("| 70% (7/10) |")
    merged = tmp_path / "merged.csv"
    assert eval_table_main([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), "--csv",
                            str(merged)]) == 0
    merged_rows = list(csv.DictReader(open(merged)))
    assert len(merged_rows) == 5 and [r["trained_for"] for r in merged_rows] == [""] * 4 + ["full"]


def test_eval_table_reads_result_csvs_keeps_runs_apart_and_plots_them(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from eval_table import blind_markdown, main as eval_table_main, markdown, read_rows

    results = tmp_path / "results.csv"
    fields = ["run", "training_commit", "encoder", "trained_for", "trained_steps", "type", "correct", "total",
              "accuracy", "visual_tokens", "videos", "blind"]
    with open(results, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for run, encoder, tokens, correct in (("run 8", "dynfocus", 48, 6), ("run 8", "dynfocus-rods-off", 28, 2),
                                              ("run 6", "dynfocus", 48, 5), ("base", "pool-4x4", 192, 3)):
            for kind in ("colour", "all"):
                writer.writerow({"run": run, "training_commit": "abc", "encoder": encoder, "trained_for": "dynfocus",
                                 "trained_steps": 2000, "type": kind, "correct": correct, "total": 8,
                                 "accuracy": correct / 8, "visual_tokens": tokens, "videos": 4, "blind": 0.25})
    rows = read_rows([results], runs=["run 8", "run 6"])
    table = markdown(rows).splitlines()
    assert table[0].startswith("| run | encoder |") and len(table) == 5   # run 6's dynfocus is a row of its own
    assert table[2].startswith("| run 8 | dynfocus | dynfocus (2000) | 48 | 4 | 75% (6/8) |")
    assert table[4].startswith("| run 6 | dynfocus |") and table[4].endswith("| 62% (5/8) |")
    blind = blind_markdown(rows).splitlines()
    assert blind[3] == "| run 8 | dynfocus-rods-off | dynfocus (2000) | 25% / 25% | 25% / 25% |"
    plot = tmp_path / "plot.png"
    assert eval_table_main([str(results), "--run", "base", "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_layout_mismatch_marks_baselines_scored_with_another_layouts_projectors():
    from dynfocus_infer.evaluation.run import layout_mismatch, row_label, trained_encoder

    assert trained_encoder({}) is None                       # random weights: nothing to compare
    assert trained_encoder({"seed": 0}) == "dynfocus"         # runs before --visual-encoder, the shipped card
    assert trained_encoder({"seed": 0, "visual_encoder": "llama-vid"}) == "llama-vid"
    assert not layout_mismatch("llama-vid", "llama-vid") and not layout_mismatch("full", None)
    assert not layout_mismatch("dynfocus-rods-off", "dynfocus")   # a run-time switch of the same connector
    assert layout_mismatch("full", "dynfocus") and layout_mismatch("dynfocus", "llama-vid")
    assert row_label({"encoder": "pool-4x4", "trained_for": "dynfocus"}) == "pool-4x4 (dynfocus's projectors)"
    assert row_label({"encoder": "pool-4x4", "trained_for": "pool-4x4", "trained_steps": 900}) == "pool-4x4, 900 steps"
    assert row_label({"encoder": "full", "trained_for": "", "trained_steps": ""}) == "full"


def test_eval_scores_the_encoder_the_weights_were_trained_for_and_records_it(tmp_path, capsys):
    from safetensors.torch import save_file

    from dynfocus_infer.engine import LLM
    from dynfocus_infer.training.checkpoint import visual_state

    data = tmp_path / "data"
    write_dataset(data, 2, seed=8)
    run = tmp_path / "run"
    run.mkdir()
    save_file(visual_state(LLM("tiny", num_frames=4, device="cpu").model), str(run / "visual.safetensors"))
    (run / "visual_config.json").write_text(json.dumps({"training": {"seed": 0, "steps": 7,
                                                                     "visual_encoder": "pool-4x4"}}))
    table = evaluate(tmp_path / "out", model="tiny", data=str(data), weights=str(run / "visual.safetensors"),
                     num_frames=4, max_tokens=2, max_questions=3)
    assert {r["encoder"] for r in table} == {"pool-4x4"}
    assert all(r["trained_for"] == "pool-4x4" and r["trained_steps"] == 7 for r in table)
    rows = list(csv.DictReader(open(tmp_path / "out" / "accuracy.csv")))
    assert {(r["encoder"], r["trained_for"], r["trained_steps"]) for r in rows} == {("pool-4x4", "pool-4x4", "7")}
    assert main(["eval", "--out", str(tmp_path / "out2"), "--model", "tiny", "--data", str(data), "--weights",
                 str(run / "visual.safetensors"), "--encoders", "dynfocus,pool-4x4", "--frames", "4",
                 "--max-tokens", "2", "--max-questions", "2"]) == 0
    err = capsys.readouterr().err
    assert "note: dynfocus was scored with weights trained for pool-4x4's token layout" in err
    assert "note: pool-4x4" not in err


def test_eval_table_sets_blind_accuracy_from_predictions_of_older_runs(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from eval_table import blind_markdown, main as eval_table_main, markdown, read_rows

    old = tmp_path / "old"  # accuracy.csv from before the blind column, with its predictions.jsonl
    old.mkdir()
    predictions = [{"encoder": "dynfocus", **_row("shape", a, "square")} for a in ("circle", "square", "triangle")]
    predictions += [{"encoder": "dynfocus", **_row("describe", "A red circle.", "A red circle.")}]
    (old / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    with open(old / "accuracy.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["encoder", "type", "correct", "total", "accuracy",
                                                    "visual_tokens", "videos"])
        writer.writeheader()
        for kind, correct, total in (("shape", 1, 3), ("describe", 1, 1), ("all", 2, 4)):
            writer.writerow({"encoder": "dynfocus", "type": kind, "correct": correct, "total": total,
                             "accuracy": correct / total, "visual_tokens": 48.0, "videos": 1})
    rows = read_rows([old])
    assert [r["blind"] for r in rows] == ["0.3333", "", ""]
    table = blind_markdown(rows).splitlines()
    assert table[0] == "| encoder | trained for (steps) | shape: model / blind |"
    assert table[2] == "| dynfocus | - | 33% / 33% |"
    again = tmp_path / "again"  # the same key scored again (older rows: no trained_*): a row of its own
    again.mkdir()
    (again / "accuracy.csv").write_text((old / "accuracy.csv").read_text().replace(",1,3,", ",2,3,"))
    table = markdown(read_rows([old, again])).splitlines()
    assert len(table) == 4 and "| 33% (1/3) |" in table[2] and "(2/3) |" in table[3]
    empty = tmp_path / "empty"  # no predictions and no blind column: no second table
    empty.mkdir()
    (empty / "accuracy.csv").write_text((old / "accuracy.csv").read_text())
    assert blind_markdown(read_rows([empty])) == ""
    assert eval_table_main([str(old)]) == 0
