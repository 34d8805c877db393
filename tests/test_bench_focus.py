"""bench/bench_focus.py's smoke run: the three modes run, and the extra cost it reports is what focus did."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_focus  # noqa: E402


def test_smoke_run_reports_the_cost_of_each_mode():
    measured = bench_focus.main(["--smoke"])
    assert [(row["model"], row["mode"]) for row in measured] == [
        ("tiny", "plain"), ("tiny", "llm"), ("tiny", "dpe"), ("slowfocus-tiny", "plain"), ("slowfocus-tiny", "llm")]
    slow = {row["mode"]: row for row in measured if row["model"] == "slowfocus-tiny"}
    assert slow["plain"]["extra_tokens"] == 0 and slow["llm"]["status"] == "parsed"
    # SlowFocus's pass 2 shows every dense frame beside the sparse ones, a frame in both twice: 17 tokens a frame.
    assert slow["llm"]["extra_tokens"] > slow["llm"]["dense"] * 17 and slow["llm"]["extra_encoded"] > 0
    rows = {row["mode"]: row for row in measured if row["model"] == "tiny"}
    plain, llm, dpe = rows["plain"], rows["llm"], rows["dpe"]
    assert plain["extra_encoded"] == plain["extra_tokens"] == 0 and plain["total_vs_plain"] == 1
    assert llm["status"] == "parsed" and 0 < llm["extra_encoded"] <= llm["dense"]
    assert llm["extra_tokens"] > 0 and llm["prompt_tokens"] > plain["prompt_tokens"]
    assert dpe["status"] == "events" and dpe["extra_encoded"] > 0
    assert dpe["prompt_tokens"] > plain["prompt_tokens"]

def test_the_forced_grounding_answer_does_not_outlive_the_run():
    from dynfocus_infer.core.focus_stage import FocusStage
    before = FocusStage.__dict__["_grounding_text"]
    bench_focus.main(["--smoke"])
    assert FocusStage.__dict__["_grounding_text"] is before
