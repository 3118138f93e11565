#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this):
#   scripts/test.sh
# Installs what is missing (registry servers, protoc, chromium and
# chromedriver, prometheus), starts the registry
# servers on loopback, runs formatting, lints and every test with every
# backend compiled in and real servers REQUIRED (RPC_REQUIRE_SERVERS=1: a
# missing server fails instead of skipping), validates the docker compose
# files, runs the quick start, a real Prometheus scraping the examples, the
# etcd, ZooKeeper and Consul cluster tests and a short fuzzing run, and
# stops the servers again, even when something fails.
set -euo pipefail
cd "$(dirname "$0")/.."

export RPC_REQUIRE_SERVERS=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# A clean CI clone builds once: incremental state would only double the disk
# the build takes.
if [[ -n "${CI:-}" ]]; then
  export CARGO_INCREMENTAL=0
fi
SERVERS=(etcd zookeeper consul nacos)

scripts/registry-servers.sh install "${SERVERS[@]}"
# Debian's chromium and chromedriver, for the console's browser test.
scripts/browser.sh install
trap 'scripts/registry-servers.sh down "${SERVERS[@]}"' EXIT
scripts/registry-servers.sh up "${SERVERS[@]}"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (all features)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

echo "== docker compose files"
for f in docker/*/docker-compose*.yml; do
  docker-compose -f "$f" config -q
  echo "valid: $f"
done

echo "== tests (all features, real servers required)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-features --no-fail-fast
  # nextest does not run doctests.
  cargo test --workspace --all-features --doc
else
  cargo test --workspace --all-features --no-fail-fast
fi

echo "== quick start (embedded registry)"
scripts/quickstart.sh --calls 200 --concurrency 8

echo "== Prometheus (Debian's package) scraping the examples under load"
scripts/prometheus-check.sh

# One release build of the examples with every backend, shared by the
# cluster scripts below.
export RPC_EXAMPLE_FEATURES=etcd,zookeeper,consul,nacos

echo "== examples on a three-member etcd cluster"
scripts/etcd-cluster-test.sh

echo "== examples on a three-member ZooKeeper ensemble"
scripts/zookeeper-cluster-test.sh

echo "== examples on a three-server Consul cluster"
scripts/consul-cluster-test.sh

# Coverage-guided fuzzing of the wire decoders, briefly, so the targets
# keep building and a regression that crashes early is caught (the long
# runs, 10 min per target, are reported in docs/fuzzing.md). Servers are
# not needed: stop them first to give the fuzzer the CPU.
scripts/registry-servers.sh down "${SERVERS[@]}"
echo "== fuzzing (30 s per target)"
scripts/fuzz.sh 30
