# Sourced by the other scripts: make .venv if needed and install the project with EXTRAS.
# An install is remembered (a stamp per set of extras, keyed by pyproject.toml), so a second
# run installs nothing and starts at once; the project itself is installed editable, so code
# changes need no reinstall either (the C sources of the compiled parts are in the stamp's
# key, so a change to them rebuilds those parts).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
SPEC="."
if [ -n "${EXTRAS:-}" ]; then
    SPEC=".[${EXTRAS}]"
fi
STAMP=".venv/.enginehouse-installed-${EXTRAS:-base}"
WANTED="$(cat pyproject.toml setup.py src/enginehouse/*/*.c | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANTED" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e "$SPEC"
    echo "$WANTED" > "$STAMP"
fi
