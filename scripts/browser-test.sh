#!/usr/bin/env bash
# The dashboard's browser test (runtime/tests/browser/dashboard.mjs): a job
# with its REST API, opened in headless Chromium. Installs what is missing:
# Debian's chromium (apt-get), Node.js (apt-get), playwright-core (npm ci).
#
#   scripts/browser-test.sh        # screenshot in $CARGO_TARGET_DIR/dashboard.png
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice-target}"

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
    echo "scripts/browser-test.sh: need root (or sudo) to install: $*" >&2; return 1; fi
}
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get install -y -q "$@" || { as_root apt-get update -q && as_root apt-get install -y -q "$@"; }
}

if [ ! -x /usr/bin/chromium ]; then
  echo "scripts/browser-test.sh: installing Debian's chromium"
  apt_install chromium
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "scripts/browser-test.sh: installing Node.js"
  apt_install nodejs npm
fi
dir=runtime/tests/browser
if [ ! -d "$dir/node_modules/playwright-core" ]; then
  (cd "$dir" && npm ci --no-audit --no-fund)
fi
cargo build -q -p sluice-runtime --bin sluice
SLUICE_BIN="$CARGO_TARGET_DIR/debug/sluice" SCREENSHOT="$CARGO_TARGET_DIR/dashboard.png" node "$dir/dashboard.mjs"
