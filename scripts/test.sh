#!/usr/bin/env bash
# Install enginehouse with its test dependencies into .venv (and the Debian packages tests
# use, where this shell may), then lint, type-check and test. GPU tests in tests/gpu skip
# themselves on machines without a GPU. pytest reports the 15 slowest tests.
set -euo pipefail
EXTRAS=test source "$(dirname "$0")/venv.sh"
source scripts/system-packages.sh
.venv/bin/ruff check src tests examples bench
.venv/bin/ruff format --check src tests examples bench
.venv/bin/mypy
.venv/bin/python -m pytest -q --durations=15 "$@"
