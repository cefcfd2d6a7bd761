#!/usr/bin/env bash
# The dashboard's browser test (runtime/tests/browser/dashboard.mjs): a job
# with its REST API, opened in headless Chromium. Installs what is missing:
# Debian's chromium (apt-get), npm (apt-get), Node.js 20 or later (what
# playwright-core 1.65 needs: when `node` is missing or older, as Debian
# bookworm's 18 is, the npm package node-linux-<arch>@20 from the npm
# registry into ~/.cache/sluice-node, no root needed), playwright-core
# (npm ci).
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

# Node.js: playwright-core 1.65 needs 20 or later.
NODE_MIN=20
node_major() { "$1" --version 2>/dev/null | sed -n 's/^v\([0-9][0-9]*\)\..*/\1/p'; }
node_too_old() {
  local major
  major=$(command -v node >/dev/null 2>&1 && node_major node || true)
  [ -z "$major" ] || [ "$major" -lt "$NODE_MIN" ]
}
node_found() { command -v node >/dev/null 2>&1 && node --version 2>/dev/null || echo "no node on PATH"; }
dir=runtime/tests/browser
if { node_too_old || [ ! -d "$dir/node_modules/playwright-core" ]; } && ! command -v npm >/dev/null 2>&1; then
  echo "scripts/browser-test.sh: installing npm (Debian's nodejs and npm)"
  apt_install nodejs npm || {
    echo "scripts/browser-test.sh: npm is missing and could not be installed; it is needed to install" >&2
    echo "  Node.js >= $NODE_MIN (found: $(node_found)) and playwright-core. Install Node.js >= $NODE_MIN with npm." >&2
    exit 1
  }
fi
if node_too_old; then
  prefix="$HOME/.cache/sluice-node"
  case "$(uname -m)" in
    x86_64 | amd64) arch=x64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *) arch="" ;;
  esac
  bin="$prefix/node_modules/.bin"
  major=$(node_major "$bin/node" || true)
  if [ -n "$arch" ] && { [ -z "$major" ] || [ "$major" -lt "$NODE_MIN" ]; }; then
    echo "scripts/browser-test.sh: Node.js >= $NODE_MIN needed (found: $(node_found)); installing node-linux-$arch@$NODE_MIN from the npm registry into $prefix"
    npm install --prefix "$prefix" --no-audit --no-fund "node-linux-$arch@$NODE_MIN" || true
  fi
  export PATH="$bin:$PATH"
  if node_too_old; then
    echo "scripts/browser-test.sh: playwright-core needs Node.js >= $NODE_MIN; found: $(node_found)," >&2
    echo "  and node-linux-${arch:-<arch>}@$NODE_MIN could not be installed from the npm registry" >&2
    echo "  (machine: $(uname -m)). Install Node.js >= $NODE_MIN and put it first on PATH." >&2
    exit 1
  fi
  echo "scripts/browser-test.sh: using Node.js $(node --version) from $bin"
fi
if [ ! -d "$dir/node_modules/playwright-core" ]; then
  (cd "$dir" && npm ci --no-audit --no-fund)
fi
cargo build -q -p sluice-runtime --bin sluice
SLUICE_BIN="$CARGO_TARGET_DIR/debug/sluice" SCREENSHOT="$CARGO_TARGET_DIR/dashboard.png" node "$dir/dashboard.mjs"
