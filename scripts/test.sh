#!/usr/bin/env bash
# Runs every test of the workspace (unit, integration, doc tests, the
# exactly-once harness, the crash test, the S3 tests against a real Garage
# server on 127.0.0.1, the dashboard in headless Chromium). Installs and
# starts what the tests need when it is missing (Garage: `cargo install`,
# once; Debian's chromium and playwright-core: scripts/browser-test.sh), and
# stops the server at the end.
#
#   scripts/test.sh                          # all tests
#   SLUICE_EO_SEEDS=1000 scripts/test.sh     # more seeds for the exactly-once harness
#   SLUICE_CRASH_KILLS=100 scripts/test.sh   # more kills in the crash test
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice-target}"
if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/test.sh: cargo is not installed; install Rust from https://rustup.rs" >&2
  exit 1
fi

# The S3 server. The tests must not skip silently: fail here if it cannot start.
started_s3=""
if [ -z "${AWS_ENDPOINT_URL:-}" ]; then
  if ! scripts/s3-server.sh start; then
    echo "scripts/test.sh: the S3 test server (Garage) could not start; see above" >&2
    exit 1
  fi
  started_s3=1
  eval "$(scripts/s3-server.sh env)"
  trap 'scripts/s3-server.sh stop' EXIT
fi
export SLUICE_REQUIRE_S3=1
export SLUICE_S3_SCRIPT="$PWD/scripts/s3-server.sh"
[ -n "$started_s3" ] && export SLUICE_S3_CONTROL=1

cargo test --workspace --lib --bins --tests
cargo test --workspace --doc
# The dashboard in headless Chromium (installs chromium and playwright-core
# when missing).
scripts/browser-test.sh
