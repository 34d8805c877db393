#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite. Without CUDA, Triton kernels run through the
# interpreter (tests/conftest.py sets TRITON_INTERPRET=1) and GPU-marked tests are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q tests "$@"
