#!/usr/bin/env bash
# Runs every test of the workspace (unit, integration, doc tests, the
# exactly-once harness). Installs what the tests need when it is missing.
#
#   scripts/test.sh            # all tests
#   SLUICE_EO_SEEDS=1000 scripts/test.sh   # more seeds for the exactly-once harness
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice-target}"
if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/test.sh: cargo is not installed; install Rust from https://rustup.rs" >&2
  exit 1
fi
cargo test --workspace --all-targets
cargo test --workspace --doc
