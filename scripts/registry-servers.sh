#!/usr/bin/env bash
# Installs (if missing) and runs real registry servers on loopback for tests.
#
#   scripts/registry-servers.sh up     [etcd|all ...]   install if missing, start, wait until ready
#   scripts/registry-servers.sh down   [etcd|all ...]   stop exactly the processes this script started
#   scripts/registry-servers.sh status [etcd|all ...]
#   scripts/registry-servers.sh install [etcd|all ...]  install only (also the build tools: protoc)
#
# Each server keeps its pid, log and data under $RPC_SERVERS_DIR (default
# /tmp/rpc-servers). Ports: etcd 2379/2380, zookeeper 2181, consul 8500
# (+8300-8302), nacos 8848/9848/10848. A port already taken is an error:
# readiness checks would otherwise talk to someone else's server.
set -euo pipefail

STATE="${RPC_SERVERS_DIR:-/tmp/rpc-servers}"
ALL=(etcd zookeeper consul nacos)
READY_SECS=30

log() { printf '[registry-servers] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

read_pid() { [ -f "$STATE/$1.pid" ] && cat "$STATE/$1.pid" || true; }

# shellcheck source=apt-lib.sh
. "$(dirname "$0")/apt-lib.sh"

# Tools every build with registry features needs.
ensure_build_tools() {
  local missing=()
  command -v protoc >/dev/null || missing+=(protobuf-compiler)
  [ -e /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

# Waits until "$2" (a command) succeeds, while pid "$1" lives.
wait_ready() {
  local name=$1 pid=$2; shift 2
  local deadline=$((SECONDS + READY_SECS))
  while [ $SECONDS -lt $deadline ]; do
    pid_alive "$pid" || { tail -n 30 "$STATE/$name.log" >&2 || true; die "$name exited during start-up (log above)"; }
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  tail -n 30 "$STATE/$name.log" >&2 || true
  die "$name not ready after ${READY_SECS}s"
}

stop_pid() {
  local name=$1 pid
  pid=$(read_pid "$name")
  if pid_alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do pid_alive "$pid" || break; sleep 0.2; done
    if pid_alive "$pid"; then log "$name did not stop in 10s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    log "$name stopped (pid $pid)"
  fi
  rm -f "$STATE/$name.pid"
  rm -rf "$STATE/$name.data"
}

# ---------------------------------------------------------------- etcd
etcd_install() {
  ensure_build_tools
  if command -v etcd >/dev/null && command -v etcdctl >/dev/null; then
    log "etcd present: $(etcd --version | head -n 1)"
    return
  fi
  apt_install etcd-server etcd-client
  # Should the package have started its own service anyway, stop it: the port is ours.
  if [ -x /etc/init.d/etcd ]; then /etc/init.d/etcd stop >/dev/null 2>&1 || true; fi
}

etcd_ready() { ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 --command-timeout=2s endpoint health; }

etcd_up() {
  if pid_alive "$(read_pid etcd)"; then log "etcd already running (pid $(read_pid etcd))"; return; fi
  etcd_install
  for p in 2379 2380; do port_open $p && die "port $p is taken by another process; stop it first"; done
  rm -rf "$STATE/etcd.data"
  etcd --name ci --data-dir "$STATE/etcd.data" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster ci=http://127.0.0.1:2380 --initial-cluster-state new \
    >"$STATE/etcd.log" 2>&1 &
  echo $! >"$STATE/etcd.pid"
  wait_ready etcd "$!" etcd_ready
  log "etcd ready on 127.0.0.1:2379 (pid $(read_pid etcd))"
}

etcd_status() {
  if pid_alive "$(read_pid etcd)" && etcd_ready >/dev/null 2>&1; then echo "etcd: running (pid $(read_pid etcd))"; else echo "etcd: down"; fi
}

# ---------------------------------------------------------------- zookeeper
# Debian's ZooKeeper 3.8, standalone on 127.0.0.1:2181 with its own zoo.cfg and
# a fresh data dir under $STATE, run as ZooKeeperServerMain directly (Debian's
# zkServer.sh and service scripts insist on /etc/zookeeper and /var/log).
# tickTime=500 rather than the usual 2000: the server clamps session timeouts
# to [minSessionTimeout, maxSessionTimeout], by default [2, 20] ticks, so this
# allows sessions from 1 s (the tests ask for 2 s, the etcd suite's TTL), reaps
# expired sessions every 0.5 s, and maxSessionTimeout=60000 keeps the default
# ttl_secs (30) as configured.
ZK_PORT=2181
ZK_CLASSPATH=/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar

zookeeper_install() {
  # netty: the TLS test runs a private server with a secure (Netty) port.
  if [ -e /usr/share/java/zookeeper.jar ] && [ -e /usr/share/java/slf4j-simple.jar ] && [ -e /usr/share/java/netty-codec.jar ] && command -v java >/dev/null; then
    log "zookeeper present: $(dpkg-query -W -f '${Version}' zookeeper 2>/dev/null || echo unknown version)"
    return
  fi
  apt_install zookeeper
  # Should the package have started its own service anyway, stop it: the port is ours.
  if [ -x /etc/init.d/zookeeper ]; then /etc/init.d/zookeeper stop >/dev/null 2>&1 || true; fi
}

# A four-letter command over bash's /dev/tcp (no nc on a fresh machine).
zookeeper_4lw() {
  (exec 3<>"/dev/tcp/127.0.0.1/$ZK_PORT" && printf '%s' "$1" >&3 && timeout 2 cat <&3) 2>/dev/null
}

# Ready: `srvr` reports the mode. (`ruok` answers imok before the server serves.)
zookeeper_ready() { zookeeper_4lw srvr | grep -q 'Mode: standalone'; }

zookeeper_up() {
  if pid_alive "$(read_pid zookeeper)"; then log "zookeeper already running (pid $(read_pid zookeeper))"; return; fi
  zookeeper_install
  port_open $ZK_PORT && die "port $ZK_PORT is taken by another process; stop it first"
  rm -rf "$STATE/zookeeper.data"
  mkdir -p "$STATE/zookeeper.data"
  cat >"$STATE/zookeeper.cfg" <<CFG
tickTime=500
maxSessionTimeout=60000
dataDir=$STATE/zookeeper.data
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr,stat,mntr,cons
CFG
  java -Xmx256m -cp "$ZK_CLASSPATH" org.apache.zookeeper.server.ZooKeeperServerMain "$STATE/zookeeper.cfg" \
    >"$STATE/zookeeper.log" 2>&1 &
  echo $! >"$STATE/zookeeper.pid"
  wait_ready zookeeper "$!" zookeeper_ready
  log "zookeeper ready on 127.0.0.1:$ZK_PORT (pid $(read_pid zookeeper))"
}

zookeeper_status() {
  if pid_alive "$(read_pid zookeeper)" && zookeeper_ready; then echo "zookeeper: running (pid $(read_pid zookeeper))"; else echo "zookeeper: down"; fi
}

# ---------------------------------------------------------------- consul
# Consul is not in bookworm: take the MPL-licensed 1.8.7 from Debian bullseye's
# package, through a private apt configuration pointed at the machine's own
# Debian mirror (read from its apt sources, never written here), check the
# sha256, and extract the binary (no dpkg -i: its postinst starts a daemon on
# 8500). When bullseye cannot be reached, the same .deb is taken from
# shared/vendor/ beside the repository.
CONSUL_DEB_VERSION=1.8.7+dfsg1-2+b3
CONSUL_DEB_SHA256=e4e888bba104daba1d9161f49bfc52649a7e4efd45b1a7ead5bc54f2cb9c89d9
CONSUL_HTTP=127.0.0.1:8500

debian_mirror() {
  local f=/etc/apt/sources.list.d/debian.sources
  if [ -f "$f" ]; then awk '/^URIs:/{print $2; exit}' "$f"; return; fi
  [ -f /etc/apt/sources.list ] && awk '$1=="deb"{for(i=2;i<=NF;i++) if($i ~ /^https?:/){print $i; exit}}' /etc/apt/sources.list
}

consul_install() {
  command -v curl >/dev/null || apt_install curl ca-certificates
  if command -v consul >/dev/null; then
    log "consul present: $(consul version | head -n 1) ($(command -v consul))"
    return
  fi
  [ "$(dpkg --print-architecture)" = amd64 ] || die "the pinned consul package is amd64 only"
  local w uri deb vendor
  w=$(mktemp -d)
  mkdir -p "$w/lists/partial" "$w/cache/archives/partial" "$w/x"
  uri=$(debian_mirror || true)
  if [ -n "$uri" ]; then
    echo "deb $uri bullseye main" >"$w/sources.list"
    local o=(-o Dir::Etc::SourceList="$w/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o Dir::State::Lists="$w/lists" -o Dir::Cache="$w/cache" -o APT::Sandbox::User=root -qq)
    log "downloading consul $CONSUL_DEB_VERSION from Debian bullseye"
    if apt-get "${o[@]}" update >/dev/null 2>&1; then
      (cd "$w" && apt-get "${o[@]}" download "consul=$CONSUL_DEB_VERSION" >/dev/null 2>&1) || true
    fi
  fi
  deb=$(find "$w" -maxdepth 1 -name 'consul_*.deb' | head -n 1)
  if [ -z "$deb" ]; then
    deb="$w/consul_${CONSUL_DEB_VERSION}_amd64.deb"
    # In CI the clone sits next to a copy of shared/: resolve from the repository's parent.
    vendor="$(cd "$(dirname "$0")/../.." && pwd)/shared/vendor/consul_${CONSUL_DEB_VERSION}_amd64.deb"
    [ -f "$vendor" ] || die "cannot download consul $CONSUL_DEB_VERSION and no fallback at $vendor"
    log "bullseye unreachable: using $vendor"
    cp "$vendor" "$deb"
  fi
  echo "$CONSUL_DEB_SHA256  $deb" | sha256sum -c --quiet - || die "consul package checksum mismatch"
  dpkg-deb -x "$deb" "$w/x"
  install -m 0755 "$w/x/usr/bin/consul" /usr/local/bin/consul
  rm -rf "$w"
  log "installed $(consul version | head -n 1) to /usr/local/bin/consul"
}

# Ready: the leader endpoint answers with a non-empty quoted address.
consul_ready() { curl -fsS --max-time 2 "http://$CONSUL_HTTP/v1/status/leader" | grep -Eq '^"[^"]+"$'; }

consul_up() {
  if pid_alive "$(read_pid consul)"; then log "consul already running (pid $(read_pid consul))"; return; fi
  consul_install
  for p in 8500 8300 8301 8302; do port_open $p && die "port $p is taken by another process; stop it first"; done
  rm -rf "$STATE/consul.data"
  mkdir -p "$STATE/consul.data"
  # Dev mode: one server, state in memory. No DNS, no gRPC, no update check.
  consul agent -dev -bind 127.0.0.1 -client 127.0.0.1 -http-port 8500 -dns-port -1 -grpc-port -1 -log-level info \
    -data-dir "$STATE/consul.data" -hcl 'disable_update_check = true' \
    >"$STATE/consul.log" 2>&1 &
  echo $! >"$STATE/consul.pid"
  wait_ready consul "$!" consul_ready
  log "consul ready on $CONSUL_HTTP (pid $(read_pid consul))"
}

consul_status() {
  if pid_alive "$(read_pid consul)" && consul_ready; then echo "consul: running (pid $(read_pid consul))"; else echo "consul: down"; fi
}

# ---------------------------------------------------------------- nacos
# rnacos, a Rust server compatible with the Nacos 1.x HTTP and 2.x gRPC client
# APIs (the official Nacos is a Java distribution that cannot be fetched
# here), pinned and built once with cargo; an installed binary of the pinned
# version is reused. It reads ./.env from its working directory and binds
# 0.0.0.0 by default: it runs from its own data directory, bound to loopback.
# Ports: HTTP 8848, gRPC 9848 (HTTP + 1000, where Nacos 2.x clients expect
# it), console 10848.
RNACOS_VERSION=0.8.8
NACOS_HTTP_PORT=8848

# An rnacos binary of the pinned version (on the PATH or in cargo's bin dir).
rnacos_bin() {
  local b
  for b in "$(command -v rnacos 2>/dev/null || true)" "${CARGO_HOME:-$HOME/.cargo}/bin/rnacos"; do
    if [ -n "$b" ] && [ -x "$b" ] && [ "$("$b" --version 2>/dev/null)" = "rnacos $RNACOS_VERSION" ]; then
      echo "$b"
      return 0
    fi
  done
  return 1
}

nacos_install() {
  command -v curl >/dev/null || apt_install curl ca-certificates
  local bin
  if bin=$(rnacos_bin); then
    log "rnacos present: $("$bin" --version) ($bin)"
    return
  fi
  command -v cargo >/dev/null || die "cargo is needed to build rnacos"
  log "building rnacos $RNACOS_VERSION with cargo install --locked: this takes about 13 minutes on 2 cores (once per machine)"
  cargo install rnacos --version "$RNACOS_VERSION" --locked
  bin=$(rnacos_bin) || die "no rnacos $RNACOS_VERSION found after cargo install"
  log "installed $("$bin" --version) to $bin"
}

# Ready: rnacos' health endpoint answers "success".
nacos_ready() { curl -fsS --max-time 2 "http://127.0.0.1:$NACOS_HTTP_PORT/health" | grep -q success; }

nacos_up() {
  if pid_alive "$(read_pid nacos)"; then log "nacos already running (pid $(read_pid nacos))"; return; fi
  nacos_install
  local p bin
  for p in $NACOS_HTTP_PORT $((NACOS_HTTP_PORT + 1000)) $((NACOS_HTTP_PORT + 2000)); do
    port_open "$p" && die "port $p is taken by another process; stop it first"
  done
  bin=$(rnacos_bin)
  rm -rf "$STATE/nacos.data"
  mkdir -p "$STATE/nacos.data"
  # The subshell execs rnacos in the data directory, so $! is rnacos itself.
  (cd "$STATE/nacos.data" && exec env RNACOS_SDK_HOST=127.0.0.1 RNACOS_CONSOLE_HOST=127.0.0.1 \
    RNACOS_HTTP_PORT=$NACOS_HTTP_PORT RNACOS_GRPC_PORT=$((NACOS_HTTP_PORT + 1000)) \
    RNACOS_HTTP_CONSOLE_PORT=$((NACOS_HTTP_PORT + 2000)) RNACOS_DATA_DIR="$PWD/db" \
    "$bin") >"$STATE/nacos.log" 2>&1 &
  echo $! >"$STATE/nacos.pid"
  wait_ready nacos "$!" nacos_ready
  log "nacos (rnacos $RNACOS_VERSION) ready on 127.0.0.1:$NACOS_HTTP_PORT, gRPC $((NACOS_HTTP_PORT + 1000)) (pid $(read_pid nacos))"
}

nacos_status() {
  if pid_alive "$(read_pid nacos)" && nacos_ready; then echo "nacos: running (pid $(read_pid nacos))"; else echo "nacos: down"; fi
}

# ---------------------------------------------------------------- main
action=${1:-}
shift || true
servers=("$@")
if [ ${#servers[@]} -eq 0 ] || [ "${servers[0]}" = all ]; then servers=("${ALL[@]}"); fi
mkdir -p "$STATE"
for s in "${servers[@]}"; do
  case " ${ALL[*]} " in *" $s "*) ;; *) die "unknown server '$s' (known: ${ALL[*]})";; esac
done

case "$action" in
  install) for s in "${servers[@]}"; do "${s}_install"; done ;;
  up) for s in "${servers[@]}"; do "${s}_up"; done ;;
  down) for s in "${servers[@]}"; do stop_pid "$s"; done ;;
  status) for s in "${servers[@]}"; do "${s}_status"; done ;;
  *) die "usage: $0 up|down|status|install [${ALL[*]}|all]" ;;
esac
