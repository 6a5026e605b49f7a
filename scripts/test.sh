#!/usr/bin/env bash
# Install enginehouse with its test dependencies into .venv (and the Debian packages tests
# use, where this shell may), then lint, type-check and test. GPU tests in tests/gpu skip
# themselves on machines without a GPU. pytest runs the tests on one worker per core
# (pytest-xdist; the engine builds first) and reports the 15 slowest.
set -euo pipefail
EXTRAS=test source "$(dirname "$0")/venv.sh"
source scripts/system-packages.sh
.venv/bin/ruff check src tests examples bench
.venv/bin/ruff format --check src tests examples bench
.venv/bin/mypy
.venv/bin/python -m pytest -q -n auto --dist worksteal --durations=15 "$@"
