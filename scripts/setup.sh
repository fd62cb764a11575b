#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: apt packages that are missing, then the venv.
set -euo pipefail
missing=()
for p in $APT_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing apt packages: ${missing[*]}"
    if [ "$(id -u)" != 0 ]; then echo "setup: need root to install ${missing[*]}" >&2; exit 1; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ ! -x "$VENV/bin/python" ] || ! grep -q "include-system-site-packages = true" "$VENV/pyvenv.cfg"; then
    echo "setup: creating venv $VENV with $PY_SYS"
    "$PY_SYS" -m venv --system-site-packages "$VENV"   # python3-libnbd (module nbd) lives there
fi
"$VENV/bin/python" -m pip install -q --upgrade pip

# pyfuse3 with a fallocate handler: upstream has none, so discards on the fuse frontend's loop
# device would never reach the replicas. Built from the pinned sdist plus our patch (Cython
# regenerates the C code, ~30 s) before blockhorn itself, whose `pyfuse3==X` the local version
# X+blockhorn.N satisfies (PEP 440), so pip keeps it. Bump PYFUSE3_LOCAL when the patch changes.
PYFUSE3_VERSION=3.5.0
PYFUSE3_LOCAL="$PYFUSE3_VERSION+blockhorn.fallocate1"
PYFUSE3_PATCH="$PWD/patches/pyfuse3-fallocate.patch"
installed=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))' \
            2>/dev/null || true)
if [ "$installed" != "$PYFUSE3_LOCAL" ]; then
    echo "setup: building pyfuse3 $PYFUSE3_LOCAL (sdist $PYFUSE3_VERSION + $PYFUSE3_PATCH)"
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    fail() { echo "setup: building patched pyfuse3 failed: $1" >&2; exit 1; }
    "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: \
        "pyfuse3==$PYFUSE3_VERSION" -d "$build" || fail "cannot download the sdist from PyPI"
    tar -xzf "$build/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$build" || fail "cannot unpack the sdist"
    patch -d "$build/pyfuse3-$PYFUSE3_VERSION" -p1 --forward --batch --quiet < "$PYFUSE3_PATCH" \
        || fail "$PYFUSE3_PATCH does not apply to pyfuse3 $PYFUSE3_VERSION"
    if ! SETUPTOOLS_SCM_PRETEND_VERSION="$PYFUSE3_LOCAL" "$VENV/bin/python" -m pip install \
            --no-deps --force-reinstall "$build/pyfuse3-$PYFUSE3_VERSION" >"$build/log" 2>&1; then
        tail -n 40 "$build/log" >&2
        fail "pip install (Cython + gcc against libfuse3-dev) broke; the log's end is above"
    fi
fi
"$VENV/bin/python" -m pip install -q -e '.[test]'
"$VENV/bin/python" -c 'import pyfuse3, sys; sys.exit(not hasattr(pyfuse3.Operations, "fallocate"))' \
    || { echo "setup: pyfuse3 in $VENV has no fallocate handler (patch not built?)" >&2; exit 1; }
echo "setup: ok"
