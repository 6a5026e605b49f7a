# Sourced by test.sh: the Debian packages that tests use (promtool from prometheus), installed
# when missing and when this shell may (root, or sudo without a password). Tests that need a
# package which could not be installed skip themselves and say which.
PACKAGES=()
command -v promtool >/dev/null 2>&1 || PACKAGES+=(prometheus)
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
            || echo "could not install ${PACKAGES[*]}; tests that need them skip" >&2
    else
        echo "not root: ${PACKAGES[*]} not installed; tests that need them skip" >&2
    fi
fi
