#!/usr/bin/env bash
# The deployment proofs (tests/deploy, marker deploy): builds and runs the image with buildah on
# a local Debian base, validates the Kubernetes bundle (kustomize, Kubernetes schemas, checkov,
# yamllint), runs a real Prometheus against a real server, and restarts a fleet behind HAProxy.
# Installs the deploy extra into .venv and the Debian packages (as root or with sudo).
set -euo pipefail
EXTRAS=deploy source "$(dirname "$0")/venv.sh"
NEEDED="promtool:prometheus prometheus:prometheus buildah:buildah mmdebstrap:mmdebstrap haproxy:haproxy" \
    source scripts/system-packages.sh
command -v kubectl >/dev/null || echo "kubectl (with kustomize) is needed and not installed" >&2
.venv/bin/python -m pytest -q --durations=15 -m deploy tests/deploy "$@"
