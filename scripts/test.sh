#!/usr/bin/env bash
# Install enginehouse with its test dependencies into .venv, then lint, type-check and test.
# GPU tests in tests/gpu skip themselves on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
.venv/bin/ruff check src tests examples bench
.venv/bin/ruff format --check src tests examples bench
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
