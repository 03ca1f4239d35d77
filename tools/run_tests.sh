#!/usr/bin/env bash
# Run the pack's test suite on a fresh machine: creates its own virtual environment, installs what
# the tests need (torch included), then runs pytest.
#
#   bash tools/run_tests.sh                 # unit tests; integration tests skip without ComfyUI
#   COMFYUI_PATH=/path/to/ComfyUI bash tools/run_tests.sh   # also the integration tests
#
# Extra arguments go to pytest. PERSONALIZE_VENV overrides the environment's folder;
# PERSONALIZE_NO_MEDIAPIPE=1 leaves the optional mediapipe package out (its tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ -n "${COMFYUI_PATH:-}" ]; then
    VENV=${PERSONALIZE_VENV:-.venv-comfyui}
else
    VENV=${PERSONALIZE_VENV:-.venv}
fi
# segment-anything (the SAM nodes) and ComfyUI import torchvision, which needs the torch it was built
# for: this pair imports on CPU-only machines.
TORCH=(torch==2.14.1 torchvision==0.29.1)

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# (re)install torch when it is missing, or when torchvision does not import beside it
"$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null || "${PIP[@]}" "${TORCH[@]}"
"${PIP[@]}" -r requirements.txt pytest ruff
# ComfyUI brings transformers; the Detect-and-Compare detector (OWLv2) uses it (it does not depend on
# torch, so the pair above stays as it is).
"${PIP[@]}" transformers
# The face attribute masks: mediapipe 0.10.21 is the last release whose wheel ships its models. Its
# metadata pins numpy<2 and pulls jax, so it goes in last and without its dependencies, after what
# `mp.solutions` needs at run time (protobuf 4.x: 5.x and 7.x break its graph set-up). scikit-image
# brings the public-domain astronaut photo that the mediapipe tests use. mediapipe is optional for the
# pack (core's face landmarks replace it): PERSONALIZE_NO_MEDIAPIPE=1 leaves it out, and its tests skip
# saying why while those of core's landmarks still run.
"${PIP[@]}" scikit-image
if [ -z "${PERSONALIZE_NO_MEDIAPIPE:-}" ]; then
    "${PIP[@]}" absl-py attrs flatbuffers "protobuf>=4.25.3,<5" matplotlib opencv-python-headless
    "${PIP[@]}" --no-deps mediapipe==0.10.21
fi
if [ -n "${COMFYUI_PATH:-}" ]; then
    # ComfyUI also imports torchaudio at start-up; 2.11.0 (the newest) works beside torch 2.14.1 but
    # pins an older torch, hence --no-deps.
    "$VENV/bin/python" -c "import torchaudio" 2>/dev/null || "${PIP[@]}" --no-deps torchaudio==2.11.0
    "${PIP[@]}" -r "$COMFYUI_PATH/requirements.txt"
fi

exec "$VENV/bin/python" -m pytest tests "$@"
