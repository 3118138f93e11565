# Shared by scripts/*-cluster-test.sh (sourced from the repository root).
#
#   cluster_setup FEATURE   builds the examples (with RPC_EXAMPLE_FEATURES, else
#                           --features FEATURE), makes $work, and kills every pid
#                           in $pids and removes $work on exit
#   require_deregistered    fails unless the provider log says it deregistered

cluster_setup() {
  # The test command builds every backend in once (RPC_EXAMPLE_FEATURES) so
  # the cluster scripts share one release build.
  cargo build --release --features "${RPC_EXAMPLE_FEATURES:-$1}" -p example-provider -p example-consumer
  work=$(mktemp -d)
  pids=()
  trap cluster_cleanup EXIT
}

cluster_cleanup() {
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

require_deregistered() {
  grep -q "deregistered" "$work/provider.log" || { cat "$work/provider.log"; echo "provider did not deregister" >&2; exit 1; }
}
