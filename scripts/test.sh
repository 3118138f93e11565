#!/usr/bin/env bash
# The whole test suite: formatting, lints, every crate's tests, with the
# real-server tests required (they fail instead of skipping).
#   scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

export RPC_REQUIRE_SERVERS=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  # nextest does not run doctests.
  cargo test --workspace --doc
else
  cargo test --workspace --no-fail-fast
fi

echo "== quick start smoke test"
scripts/quickstart.sh --calls 200 --concurrency 8
