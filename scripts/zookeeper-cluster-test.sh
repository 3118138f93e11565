#!/usr/bin/env bash
# Three ZooKeeper members on loopback, configured by the very entrypoint the
# images of docker/zookeeper/docker-compose.yml run (hostnames -> 127.0.0.1,
# distinct ports), the example provider and consumer against all three servers
# and a chroot, then the same after SIGKILL of the leader: every client is
# disconnected during the election, the calls must still all succeed, and the
# provider must keep its session (reconnect, not re-register).
#   scripts/zookeeper-cluster-test.sh   (needs Debian's zookeeper; builds the examples with --features zookeeper)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cluster-lib.sh

[ -e /usr/share/java/zookeeper.jar ] && command -v java >/dev/null \
  || { echo "zookeeper not installed: scripts/registry-servers.sh install zookeeper" >&2; exit 1; }
entrypoint=docker/zookeeper/entrypoint.sh
grep -q "entrypoint.sh" docker/Dockerfile.zookeeper || { echo "Dockerfile.zookeeper does not use $entrypoint" >&2; exit 1; }

cluster_setup zookeeper

four() { (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf '%s' "$2" >&3 && timeout 2 cat <&3) 2>/dev/null || true; }

base=$((23000 + RANDOM % 5000))
servers=""
for i in 1 2 3; do servers+="${servers:+ }127.0.0.1:$((base + 10 + i)):$((base + 20 + i))"; done
hosts=()
for i in 1 2 3; do
  ZOO_MY_ID=$i ZOO_SERVERS="$servers" ZOO_CLIENT_PORT=$((base + i)) ZOO_DATA_DIR="$work/zk$i" \
    ZOO_LISTEN_ALL=false ZOO_CLIENT_ADDRESS=127.0.0.1 JAVA_OPTS=-Xmx128m \
    "$entrypoint" >"$work/zk$i.log" 2>&1 &
  pids+=($!)
  hosts+=("127.0.0.1:$((base + i))")
done
deadline=$((SECONDS + 60))
until [ "$(for i in 1 2 3; do four $((base + i)) srvr; done | grep -cE 'Mode: (leader|follower)')" = 3 ]; do
  [ $SECONDS -lt $deadline ] || { tail -n 20 "$work"/zk*.log >&2; echo "ensemble not up in 60s" >&2; exit 1; }
  sleep 0.3
done
leader=""
for i in 1 2 3; do four $((base + i)) srvr | grep -q 'Mode: leader' && leader=$i; done
address="$(IFS=,; echo "${hosts[*]}")/rpc-examples"
echo "zookeeper ensemble up: $address (leader: zk$leader)"

export RPC_REGISTRY_TYPE=zookeeper RPC_REGISTRY_ADDRESS="$address" RPC_REGISTRY_TTL_SECS=10 RPC_REGISTRY_TIMEOUT_MS=5000
"${CARGO_TARGET_DIR:-target}"/release/example-provider >"$work/provider.log" 2>&1 &
provider=$!
pids+=("$provider")

"${CARGO_TARGET_DIR:-target}"/release/example-consumer --calls 500 --concurrency 8 --wait 20

echo "SIGKILL the leader zk$leader (pid ${pids[$((leader - 1))]}); clients must carry on with the other two"
kill -KILL "${pids[$((leader - 1))]}"
"${CARGO_TARGET_DIR:-target}"/release/example-consumer --calls 500 --concurrency 8 --wait 30

kill -TERM "$provider"
wait "$provider" || { cat "$work/provider.log"; exit 1; }
require_deregistered
if grep -q "restored in a new session" "$work/provider.log"; then
  cat "$work/provider.log"; echo "the provider lost its session over a leader change" >&2; exit 1
fi
echo "zookeeper cluster test: ok"
