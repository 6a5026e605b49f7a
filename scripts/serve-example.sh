#!/usr/bin/env bash
# Install enginehouse into .venv (what serving ONNX models needs; no PyTorch), write the
# example model repository and serve it. A second run installs nothing.
set -euo pipefail
EXTRAS="" source "$(dirname "$0")/venv.sh"
if [ ! -d model_repository ]; then
    .venv/bin/python examples/make_repository.py model_repository
fi
exec .venv/bin/enginehouse serve --model-repository model_repository "$@"
