"""bench/gpu_session.sh, checked here so that a lent GPU's minutes are not lost to a typo: the script parses, rejects
an unknown part, every benchmark it runs accepts its flags, every test file it names exists, and each part's step
limits fit one 600 s device call."""
import argparse
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_session.sh"
sys.path.insert(0, str(ROOT / "bench"))


def _steps() -> list[tuple[str, int, list]]:
    """(name, limit seconds, command words) of every `step` line, continuation lines joined."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        words = shlex.split(line.strip()) if line.strip().startswith("step ") else []
        if words:
            steps.append((words[1], int(words[2]), words[3:]))
    return steps


def test_script_parses_and_rejects_an_unknown_part():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    result = subprocess.run(["bash", str(SCRIPT), "everything"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


class _Parsed(Exception):
    pass


def test_every_benchmark_accepts_the_flags_the_script_passes(monkeypatch):
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))  # a bad flag exits with status 2 before this

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    benchmarks = [words for _, _, words in _steps() if len(words) > 1 and words[1].startswith("bench/")]
    assert len(benchmarks) >= 8
    for words in benchmarks:
        module = importlib.import_module(Path(words[1]).stem)
        with pytest.raises(_Parsed):
            module.main(words[2:])


def test_every_test_file_it_runs_exists():
    files = [word for _, _, words in _steps() for word in words if word.startswith("tests/")]
    assert len(files) >= 7
    for name in files:
        assert (ROOT / name).is_file(), name


def test_each_part_fits_one_device_call():
    text = SCRIPT.read_text()
    blocks = re.findall(r'if \[ "\$part" = ([\w-]+) \][^\n]*\n(.*?)\nfi\n', text, flags=re.S)
    assert {part for part, _ in blocks} == {"kernels", "models", "profile-32", "serving"}
    limits = {name: limit for name, limit, _ in _steps()}
    for part, body in blocks:
        names = re.findall(r'step "?\$?(\w+)"? (\d+)', body)
        total = sum(int(limit) * (2 if name == "tool" else 1) for name, limit in names)  # memcheck + racecheck
        assert total <= 600, (part, total)
    assert limits["build"] <= 300
