"""The main job (`bash scripts/demo.sh`) as a fresh machine runs it: a subprocess with a minimal environment (a new
HOME, so no cached tokenizer; PATH to this interpreter and the system's tools only), with the SmolLM2 package's own
imports (`llm`, `llama_cpp`) made to fail as they do where scripts/setup.sh installed it with --no-deps."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from check_demo_output import answer_of, problems, wrong_answer  # noqa: E402
from smollm2_runtime import REFUSE_SMOLLM2_RUNTIME  # noqa: E402



def test_demo_answers_with_its_token_accounting_in_a_minimal_environment(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(REFUSE_SMOLLM2_RUNTIME)
    (tmp_path / "home").mkdir()
    env = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
        "HOME": str(tmp_path / "home"),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(tmp_path / "site"),
        "DYNFOCUS_SKIP_SETUP": "1",
        "TMPDIR": str(tmp_path),
    }
    run = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert problems(run.stdout) == [], run.stdout
    # The trained default answers the sample's question right (assets/sample.json), with 12 frames as trained.
    assert wrong_answer(run.stdout, json.loads((ROOT / "assets" / "sample.json").read_text())) == [], run.stdout
    assert "12 frames" in run.stdout and "trained here on synthetic videos only" in run.stdout, run.stdout


def test_output_checker_rejects_a_missing_answer_or_accounting():
    good = "A red circle.\n\ntokens: 16 frames, 13 keyframes, 526 visual tokens vs 4096 full\ntimings (ms): vit 1.0\n"
    assert problems(good) == []
    assert problems("tokens: 16 frames, 13 keyframes, 526 visual tokens vs 4096 full\ntimings (ms): x\n") == [
        "no answer before the token accounting"]
    assert "no token accounting" in problems("An answer.\ntimings (ms): vit 1.0\n")[0]
    assert "implausible" in problems(good.replace("526 visual", "0 visual"))[0]


def test_output_checker_scores_the_answer_as_the_evaluation_does():
    expected = {"question": "Describe the video.", "answer": "A red circle moves left. A blue square does not move.",
                "scene": {"shapes": [{"colour": "red", "kind": "circle"}, {"colour": "blue", "kind": "square"}]}}
    accounting = "\n\ntokens: 12 frames, 2 keyframes, 48 visual tokens vs 768 full\ntimings (ms): vit 1.0\n"
    right = "A red circle moves left. A blue square does not move." + accounting
    assert answer_of(right) == "A red circle moves left. A blue square does not move."
    assert wrong_answer(right, expected) == []
    missing = "A red circle moves left." + accounting
    assert "wrong answer" in wrong_answer(missing, expected)[0]
    word = {"question": "What colour is the circle?", "answer": "red", "scene": expected["scene"]}
    assert wrong_answer("Red." + accounting, word) == []
    assert wrong_answer("Blue." + accounting, word) != []
    # The demo's set-up prints its own lines first (as in CI): they are not part of the answer.
    setup = "setup: keeping installed torch 2.13.0+cpu (tested: 2.13.0)\nsetup: done (/tmp/venv/bin/python)\n"
    assert answer_of(setup + "Red." + accounting) == "Red."
    assert wrong_answer(setup + "Red." + accounting, word) == []
