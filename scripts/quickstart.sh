#!/usr/bin/env bash
# Quick start: build, start a provider, run a consumer against it, stop the
# provider. Embedded `local` registry: nothing to install but Rust.
#   scripts/quickstart.sh [extra example-consumer arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p example-provider -p example-consumer

# A private registry directory, so this demo never mixes with other runs.
export RPC_REGISTRY_ADDRESS="${RPC_REGISTRY_ADDRESS:-$(mktemp -d)/registry}"
log=$(mktemp)
"${CARGO_TARGET_DIR:-target}"/release/example-provider --config rpc.toml >"$log" 2>&1 &
provider=$!
trap 'kill -TERM "$provider" 2>/dev/null || true; wait "$provider" 2>/dev/null || true; echo "--- provider log"; cat "$log"' EXIT

"${CARGO_TARGET_DIR:-target}"/release/example-consumer --config rpc.toml "$@"
