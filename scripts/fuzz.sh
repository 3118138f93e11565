#!/usr/bin/env bash
# Coverage-guided fuzzing of the wire decoders with cargo-fuzz (libFuzzer)
# on the stable toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass the -Z
# flags it needs. Installs cargo-fuzz if it is missing (needs a C++
# compiler, Debian's g++, for libFuzzer).
#
#   scripts/fuzz.sh [SECONDS per target, default 30] [TARGET ...]
#
# Targets (fuzz/fuzz_targets/): frames, envelope, args, compressed. Seeds, derived from
# the golden frames, are in fuzz/seeds/<target>; the growing corpus goes to
# fuzz/corpus/<target> (not kept), crashes to fuzz/artifacts/<target>.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(frames envelope args compressed)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "[fuzz] installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  echo "[fuzz] $t for ${secs}s"
  # -rss_limit_mb / -malloc_limit_mb: an input that makes a decoder allocate
  # far beyond its size is a finding (an allocation bomb), not a slow run.
  cargo fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=1024 -malloc_limit_mb=256 -print_final_stats=1
done
