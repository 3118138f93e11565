#!/usr/bin/env bash
# Three etcd members on loopback with the member flags of
# docker/etcd/docker-compose.yml (hostnames -> 127.0.0.1, distinct ports), the
# example provider and consumer against all three endpoints, then the same
# after SIGKILL of one member: the calls must still all succeed.
#   scripts/etcd-cluster-test.sh      (needs `etcd`; builds the examples with --features etcd)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cluster-lib.sh

command -v etcd >/dev/null || { echo "etcd not installed: scripts/registry-servers.sh install etcd" >&2; exit 1; }
compose=docker/etcd/docker-compose.yml
# The flags used below must be the compose file's.
for flag in --name --data-dir --listen-client-urls --advertise-client-urls --listen-peer-urls \
            --initial-advertise-peer-urls --initial-cluster --initial-cluster-token --initial-cluster-state; do
  grep -q -- "$flag" "$compose" || { echo "$compose lacks $flag" >&2; exit 1; }
done

cluster_setup etcd

base=$((23000 + RANDOM % 5000))
cluster=""
for i in 1 2 3; do cluster+="${cluster:+,}etcd$i=http://127.0.0.1:$((base + 10 + i))"; done
endpoints=()
for i in 1 2 3; do
  client="http://127.0.0.1:$((base + i))"; peer="http://127.0.0.1:$((base + 10 + i))"
  etcd --name "etcd$i" --data-dir "$work/etcd$i" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$cluster" --initial-cluster-token rpc-etcd-cluster --initial-cluster-state new \
    >"$work/etcd$i.log" 2>&1 &
  pids+=($!)
  endpoints+=("$client")
done
member1=${pids[0]}
list=$(IFS=,; echo "${endpoints[*]}")
deadline=$((SECONDS + 30))
until ETCDCTL_API=3 etcdctl --endpoints="$list" --command-timeout=2s endpoint health >/dev/null 2>&1; do
  [ $SECONDS -lt $deadline ] || { tail -n 20 "$work"/etcd*.log >&2; echo "cluster not healthy in 30s" >&2; exit 1; }
  sleep 0.2
done
echo "etcd cluster up: $list"

export RPC_REGISTRY_TYPE=etcd RPC_REGISTRY_ADDRESS="$list" RPC_REGISTRY_TTL_SECS=5 RPC_REGISTRY_TIMEOUT_MS=3000
./target/release/example-provider >"$work/provider.log" 2>&1 &
provider=$!
pids+=("$provider")

./target/release/example-consumer --calls 500 --concurrency 8 --wait 20

echo "SIGKILL etcd1 (pid $member1); the provider and consumer must carry on with etcd2 and etcd3"
kill -KILL "$member1"
./target/release/example-consumer --calls 500 --concurrency 8 --wait 20

kill -TERM "$provider"
wait "$provider" || { cat "$work/provider.log"; exit 1; }
require_deregistered
echo "etcd cluster test: ok"
