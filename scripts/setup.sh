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
"$VENV/bin/python" -m pip install -q -e '.[test]'
echo "setup: ok"
