#!/usr/bin/env bash
# Three Consul servers on loopback with the agent flags of
# docker/consul/docker-compose.yml (hostnames -> 127.0.0.1, distinct ports),
# the example provider registered with server 1 and the consumer discovering
# through server 2, then the same after SIGKILL of server 3: with two of
# three servers the cluster keeps its quorum and every call must succeed.
#   scripts/consul-cluster-test.sh    (needs `consul`; builds the examples with --features consul)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cluster-lib.sh

command -v consul >/dev/null || { echo "consul not installed: scripts/registry-servers.sh install consul" >&2; exit 1; }
compose=docker/consul/docker-compose.yml
# The flags used below must be the compose file's.
for flag in -server -bootstrap-expect -node -data-dir -bind -client -retry-join disable_update_check; do
  grep -q -- "$flag" "$compose" || { echo "$compose lacks $flag" >&2; exit 1; }
done

cluster_setup consul

base=$((23000 + RANDOM % 5000))
# Server i: HTTP base+i, server RPC base+10+i, serf LAN base+20+i, serf WAN base+30+i.
for i in 1 2 3; do
  joins=()
  for j in 1 2 3; do [ "$j" = "$i" ] || joins+=(-retry-join "127.0.0.1:$((base + 20 + j))"); done
  consul agent -server -bootstrap-expect 3 -node "consul$i" -data-dir "$work/consul$i" \
    -bind 127.0.0.1 -client 127.0.0.1 "${joins[@]}" -hcl 'disable_update_check = true' \
    -http-port $((base + i)) -server-port $((base + 10 + i)) \
    -serf-lan-port $((base + 20 + i)) -serf-wan-port $((base + 30 + i)) -dns-port -1 -grpc-port -1 \
    >"$work/consul$i.log" 2>&1 &
  pids+=($!)
done
server3=${pids[2]}
http() { echo "http://127.0.0.1:$((base + $1))"; }

# Ready: every server knows the leader and the raft peer set has all three.
deadline=$((SECONDS + 60))
for i in 1 2 3; do
  until curl -fsS --max-time 2 "$(http $i)/v1/status/leader" 2>/dev/null | grep -Eq '^"[^"]+"$' \
        && [ "$(curl -fsS --max-time 2 "$(http $i)/v1/status/peers" 2>/dev/null | grep -o '"[^"]*"' | wc -l)" = 3 ]; do
    [ $SECONDS -lt $deadline ] || { tail -n 20 "$work"/consul*.log >&2; echo "cluster not ready in 60s" >&2; exit 1; }
    sleep 0.3
  done
done
echo "consul cluster up: leader $(curl -fsS "$(http 1)/v1/status/leader")"

export RPC_REGISTRY_TYPE=consul RPC_REGISTRY_TTL_SECS=5 RPC_REGISTRY_TIMEOUT_MS=3000
RPC_REGISTRY_ADDRESS="$(http 1)" ./target/release/example-provider >"$work/provider.log" 2>&1 &
provider=$!
pids+=("$provider")

RPC_REGISTRY_ADDRESS="$(http 2)" ./target/release/example-consumer --calls 500 --concurrency 8 --wait 20

echo "SIGKILL consul3 (pid $server3); two servers keep the quorum, provider and consumer carry on"
kill -KILL "$server3"
RPC_REGISTRY_ADDRESS="$(http 2)" ./target/release/example-consumer --calls 500 --concurrency 8 --wait 30

kill -TERM "$provider"
wait "$provider" || { cat "$work/provider.log"; exit 1; }
require_deregistered
left=$(curl -fsS "$(http 2)/v1/health/service/userservice-1-0" | grep -c '"ServiceID"' || true)
[ "$left" = 0 ] || { echo "the provider's instance is still in the catalog" >&2; exit 1; }
echo "consul cluster test: ok"
