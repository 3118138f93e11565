#!/usr/bin/env bash
# Three Consul servers on loopback with the agent flags of
# docker/consul/docker-compose.yml (hostnames -> 127.0.0.1, distinct ports),
# the example provider registered with one follower and the consumer
# discovering through the other, then SIGKILL of the leader and, right
# after it, a new consumer: with two of three servers the cluster keeps its
# quorum, and discovery's stale reads answer during the election, so the
# new consumer must find the provider within 5 s and every call succeed.
# (Before stale reads it waited about 10 s for its first list.)
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
leader_addr=$(curl -fsS "$(http 1)/v1/status/leader" | tr -d '"')
leader=$(( ${leader_addr##*:} - base - 10 ))
case $leader in 1|2|3) ;; *) echo "cannot tell the leader from $leader_addr" >&2; exit 1 ;; esac
followers=()
for i in 1 2 3; do [ "$i" = "$leader" ] || followers+=("$i"); done
p=${followers[0]} c=${followers[1]}
echo "consul cluster up: leader consul$leader ($leader_addr); provider on consul$p, consumer on consul$c"

export RPC_REGISTRY_TYPE=consul RPC_REGISTRY_TTL_SECS=5 RPC_REGISTRY_TIMEOUT_MS=3000
RPC_REGISTRY_ADDRESS="$(http "$p")" ./target/release/example-provider >"$work/provider.log" 2>&1 &
provider=$!
pids+=("$provider")

RPC_REGISTRY_ADDRESS="$(http "$c")" ./target/release/example-consumer --calls 500 --concurrency 8 --wait 20

echo "SIGKILL the leader consul$leader; a consumer started at once must find the provider during the election"
kill -KILL "${pids[$((leader - 1))]}"
t0=$(date +%s%N)
RPC_REGISTRY_ADDRESS="$(http "$c")" ./target/release/example-consumer --calls 500 --concurrency 8 --wait 5
echo "consumer started during the election: done in $(( ($(date +%s%N) - t0) / 1000000 )) ms"

kill -TERM "$provider"
wait "$provider" || { cat "$work/provider.log"; exit 1; }
require_deregistered
# The agent deregistered the instance; the catalog has it once a new leader
# takes the agent's sync (anti-entropy), which can outlast the election.
deadline=$((SECONDS + 60))
while :; do
  catalog=$(curl -fsS --max-time 5 "$(http "$c")/v1/health/service/userservice-1-0" || echo failed)
  if [ "$catalog" != failed ] && ! printf '%s' "$catalog" | grep -q '"ServiceID"'; then break; fi
  [ $SECONDS -lt $deadline ] || { echo "the provider's instance is still in the catalog: $catalog" >&2; exit 1; }
  sleep 0.5
done
echo "deregistration reached the catalog $((SECONDS - deadline + 60)) s after the provider stopped"
echo "consul cluster test: ok"
