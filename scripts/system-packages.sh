# Sourced by the test scripts: installs the Debian packages whose commands the tests use, when
# a command is missing and this shell may install (root, or sudo without a password). Set
# NEEDED to "command:package ..." before sourcing; the default is what scripts/test.sh needs.
# Tests whose command could not be installed say so (skip or fail, as each decides).
NEEDED="${NEEDED:-promtool:prometheus}"
PACKAGES=()
for pair in $NEEDED; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || PACKAGES+=("${pair#*:}")
done
if [ ${#PACKAGES[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        SUDO=""
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        SUDO="unavailable"
    fi
    if [ "$SUDO" != unavailable ]; then
        echo "installing Debian packages: ${PACKAGES[*]}" >&2
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${PACKAGES[@]}" >/dev/null \
            || { $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null; } \
            || echo "could not install ${PACKAGES[*]}" >&2
    else
        echo "not root: ${PACKAGES[*]} not installed" >&2
    fi
fi
