#!/usr/bin/env bash
# The main job on a fresh machine: set up (scripts/setup.sh), then answer the question of assets/sample.json about
# the bundled sample video (one of the synthetic shape videos dynfocus-smol was trained on, from a held-out seed)
# with the embedded default model (dynfocus-smol). Extra arguments go to `dynfocus-infer answer`.
# DYNFOCUS_SKIP_SETUP=1 skips the set-up (an environment already set up, as the tests run it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${DYNFOCUS_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
PY=${PYTHON:-python3}
[ -f assets/sample.mp4 ] || "$PY" scripts/make_sample_video.py
QUESTION=$("$PY" -c 'import json; print(json.load(open("assets/sample.json"))["question"])')
exec "$PY" -m dynfocus_infer.cli answer --video assets/sample.mp4 --question "$QUESTION" "$@"
