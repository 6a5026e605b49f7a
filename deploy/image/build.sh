#!/usr/bin/env bash
# Build enginehouse's image with buildah, from the Containerfile at the repository's root.
#
#   deploy/image/build.sh [--base debian|IMAGE] [--repository DIR] [--tag TAG] [--offline]
#                         [-- extra buildah bud arguments]
#
# --base debian   makes a local Debian bookworm base with mmdebstrap (python3, venv, CA
#                 certificates) for machines that reach no container registry; the default is
#                 the Containerfile's own (python:3.12-slim-bookworm).
# --repository    the model repository to bake in (default: the example one, written here).
# --offline       fetch the Python wheels on the host first (pip download) and build without
#                 a package index.
# Prints the image's size and the build's seconds on the last line.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BASE=""
REPOSITORY=""
TAG="localhost/enginehouse:cpu"
OFFLINE=0
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --base) BASE="$2"; shift 2 ;;
        --repository) REPOSITORY="$2"; shift 2 ;;
        --tag) TAG="$2"; shift 2 ;;
        --offline) OFFLINE=1; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
STARTED=$(date +%s)

if [ "$BASE" = debian ]; then
    BASE=localhost/enginehouse-base:bookworm
    if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
        echo "== making the Debian base image $BASE with mmdebstrap" >&2
        TARBALL="$(mktemp -d)/base.tar"
        mmdebstrap --variant=apt --include=python3,python3-venv,ca-certificates,libgomp1 \
            --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' bookworm "$TARBALL" >&2
        CONTAINER=$(buildah from scratch)
        buildah add "$CONTAINER" "$TARBALL" / >/dev/null
        buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            "$CONTAINER"
        buildah commit -q "$CONTAINER" "$BASE" >/dev/null
        buildah rm "$CONTAINER" >/dev/null
        rm -rf "$(dirname "$TARBALL")"
    fi
fi

# The build context: only what the Containerfile copies.
CONTEXT="$(mktemp -d)"
trap 'rm -rf "$CONTEXT"' EXIT
cp "$ROOT/Containerfile" "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/LICENSE" "$CONTEXT/"
cp -r "$ROOT/src" "$CONTEXT/src"
find "$CONTEXT/src" -name __pycache__ -prune -exec rm -rf {} +
# A compiled part built for this host's Python is not the image's: its own guard stage builds it.
find "$CONTEXT/src" -name "*.so" -delete
mkdir -p "$CONTEXT/deploy/image/wheels"
if [ -z "$REPOSITORY" ]; then
    "$PYTHON" "$ROOT/examples/make_repository.py" --no-torch "$CONTEXT/model_repository" >&2
else
    cp -r "$REPOSITORY" "$CONTEXT/model_repository"
fi
ARGS=()
if [ "$OFFLINE" = 1 ]; then
    echo "== fetching wheels on the host" >&2
    WHEELS="$ROOT/deploy/image/wheels"
    "$PYTHON" - "$ROOT/pyproject.toml" > "$CONTEXT/requirements.txt" <<'EOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))
print("\n".join(project["project"]["dependencies"] + project["build-system"]["requires"]))
EOF
    "$PYTHON" -m pip download --quiet --dest "$WHEELS" -r "$CONTEXT/requirements.txt" >&2
    cp "$WHEELS"/*.whl "$CONTEXT/deploy/image/wheels/"
    ARGS+=(--build-arg "PIP_INDEX_ARGS=--no-index")
fi
[ -n "$BASE" ] && ARGS+=(--build-arg "BASE_IMAGE=$BASE")

echo "== building $TAG" >&2
buildah bud --isolation chroot --layers -f "$CONTEXT/Containerfile" -t "$TAG" \
    "${ARGS[@]}" "${EXTRA[@]}" "$CONTEXT" >&2
SIZE=$(buildah inspect --type image --format '{{.Size}}' "$TAG" 2>/dev/null || echo 0)
if [ "$SIZE" = 0 ] || [ -z "$SIZE" ]; then
    SIZE=$(buildah images --format '{{.Size}}' "$TAG" | head -1)
fi
echo "image $TAG: size $SIZE, built in $(( $(date +%s) - STARTED )) s"
