#!/usr/bin/env bash
# Install enginehouse into .venv, write the example model repository and serve it.
set -euo pipefail
EXTRAS=examples source "$(dirname "$0")/venv.sh"
.venv/bin/python examples/make_repository.py model_repository
exec .venv/bin/enginehouse serve --model-repository model_repository "$@"
