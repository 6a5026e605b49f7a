#!/usr/bin/env bash
# Install enginehouse into .venv, write the example model repository and serve it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[examples]'
.venv/bin/python examples/make_repository.py model_repository
exec .venv/bin/enginehouse serve --model-repository model_repository "$@"
