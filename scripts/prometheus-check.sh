#!/usr/bin/env bash
# The example provider and consumer under load, scraped by a real
# Prometheus (Debian's `prometheus` package, installed here if missing):
#
#   scripts/prometheus-check.sh           assert, through Prometheus's HTTP API,
#                                         that the call counters grow and the
#                                         duration histograms have samples for
#                                         UserService:1.0 / get_user
#   scripts/prometheus-check.sh --plot F  also: two providers, SIGKILL one
#                                         mid-run, start it again, and plot
#                                         calls/s and p99 from Prometheus to F
#                                         (PNG, python3-matplotlib)
#
# Uses the release examples (built here if missing). Everything it starts
# listens on loopback and is stopped on exit; its files live in a temporary
# directory that is removed.
set -euo pipefail
cd "$(dirname "$0")/.."

PLOT=""
if [ "${1:-}" = "--plot" ]; then
  PLOT=$(realpath -m "${2:?--plot needs a file}")
fi
BIN="${CARGO_TARGET_DIR:-target}/release"
PROM_PORT=19090
P1_METRICS=19464
P2_METRICS=19466
C_METRICS=19465
WAIT_SECS=60

log() { printf '[prometheus-check] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# shellcheck source=apt-lib.sh
. scripts/apt-lib.sh

command -v prometheus >/dev/null || apt_install prometheus
command -v curl >/dev/null || apt_install curl ca-certificates
# Debian's Python, not whatever `python3` a PATH finds first (pyenv shims
# do not see Debian's python3-matplotlib).
PY=/usr/bin/python3
[ -x "$PY" ] || apt_install python3-minimal
if [ -n "$PLOT" ]; then
  "$PY" -c 'import matplotlib' 2>/dev/null || apt_install python3-matplotlib
fi
for port in $PROM_PORT $P1_METRICS $P2_METRICS $C_METRICS; do
  port_open "$port" && die "port $port is taken; stop what listens there"
done
if [ ! -x "$BIN/example-provider" ] || [ ! -x "$BIN/example-consumer" ]; then
  cargo build --release -p example-provider -p example-consumer
fi

DIR=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT
export RPC_REGISTRY_ADDRESS="$DIR/registry"
# A short TTL, so a killed provider leaves the registry within seconds.
export RPC_REGISTRY_TTL_SECS=3

STARTED="" # the pid start_provider started (not a $(...): PIDS must grow here)
start_provider() { # metrics port, log name
  RPC_METRICS_LISTEN="127.0.0.1:$1" "$BIN/example-provider" >"$DIR/$2.log" 2>&1 &
  STARTED=$!
  PIDS+=("$STARTED")
}

# Waits until "$@" succeeds, at most WAIT_SECS.
wait_for() {
  local what=$1; shift
  local deadline=$((SECONDS + WAIT_SECS))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "timed out after ${WAIT_SECS}s waiting for $what"
    sleep 0.5
  done
}

start_provider $P1_METRICS provider1
wait_for "provider 1's metrics endpoint" curl -fsS "http://127.0.0.1:$P1_METRICS/metrics"
P2=""
if [ -n "$PLOT" ]; then
  start_provider $P2_METRICS provider2
  P2=$STARTED
  wait_for "provider 2's metrics endpoint" curl -fsS "http://127.0.0.1:$P2_METRICS/metrics"
fi
LOAD_SECS=20
[ -n "$PLOT" ] && LOAD_SECS=45
RPC_METRICS_LISTEN="127.0.0.1:$C_METRICS" "$BIN/example-consumer" \
  --duration $LOAD_SECS --concurrency 4 >"$DIR/consumer.log" 2>&1 &
CONSUMER=$!
PIDS+=("$CONSUMER")
wait_for "the consumer's metrics endpoint" curl -fsS "http://127.0.0.1:$C_METRICS/metrics"

cat >"$DIR/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: rpc
    static_configs:
      - targets: ['127.0.0.1:$P1_METRICS', '127.0.0.1:$P2_METRICS', '127.0.0.1:$C_METRICS']
EOF
prometheus --config.file="$DIR/prometheus.yml" --storage.tsdb.path="$DIR/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$DIR/prometheus.log" 2>&1 &
PIDS+=($!)
START=$(date +%s)
wait_for "Prometheus to be ready" curl -fsS "http://127.0.0.1:$PROM_PORT/-/ready"
log "Prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}') is scraping on 127.0.0.1:$PROM_PORT"

# One instant query; prints the first sample's value (empty if none).
query() {
  curl -fsS --get "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$1" |
    "$PY" -c 'import json,sys
r = json.load(sys.stdin)
assert r["status"] == "success", r
res = r["data"]["result"]
print(res[0]["value"][1] if res else "")'
}
# Waits until query $1 gives a number > $2.
wait_above() {
  local q=$1 min=$2 deadline=$((SECONDS + WAIT_SECS)) v=""
  while [ $SECONDS -lt $deadline ]; do
    v=$(query "$q" || true)
    if [ -n "$v" ] && "$PY" -c "import sys; sys.exit(0 if float('$v') > $min else 1)"; then
      echo "$v"
      return 0
    fi
    sleep 1
  done
  die "timed out waiting for $q > $min (last value: '${v}')"
}

SEL='rpc_service="UserService:1.0",rpc_method="get_user"'
wait_above 'count(up{job="rpc"} == 1)' $([ -n "$PLOT" ] && echo 2 || echo 1) >/dev/null
first=$(wait_above "sum(rpc_client_calls_total{$SEL,rpc_response_status_code=\"OK\"})" 0)
log "consumer calls counted by Prometheus: $first"
second=$(wait_above "sum(rpc_client_calls_total{$SEL,rpc_response_status_code=\"OK\"})" "$first")
log "... and growing: $second"
server=$(wait_above "sum(rpc_server_calls_total{$SEL,rpc_response_status_code=\"OK\"})" 0)
log "provider calls counted: $server"
hc=$(wait_above "sum(rpc_client_call_duration_seconds_count{$SEL})" 0)
hs=$(wait_above "sum(rpc_server_call_duration_seconds_count{$SEL})" 0)
log "duration histogram samples: client $hc, server $hs"
p99=$(wait_above "histogram_quantile(0.99, sum by (le) (rate(rpc_client_call_duration_seconds_bucket{$SEL}[5s])))" 0)
log "client p99 over 5 s: ${p99} s"
wait_above 'sum(rpc_client_instances{rpc_service="UserService:1.0"})' 0 >/dev/null
wait_above 'sum(rpc_provider_registration_state{state="registered"})' 0 >/dev/null
wait_above 'sum(rpc_client_sent_bytes_total)' 0 >/dev/null
wait_above 'sum(rpc_server_received_bytes_total)' 0 >/dev/null

if [ -n "$PLOT" ]; then
  # 12 s into the load: SIGKILL provider 2; 10 s later, start it again.
  sleep $((START + 12 - $(date +%s) > 0 ? START + 12 - $(date +%s) : 0))
  KILLED=$(date +%s.%N)
  kill -KILL "$P2"
  log "SIGKILLed provider 2 (pid $P2)"
  sleep 10
  RESTARTED=$(date +%s.%N)
  start_provider $P2_METRICS provider2-again
  P2=$STARTED
  log "started provider 2 again (pid $P2)"
fi

wait "$CONSUMER" || die "the consumer reported failed calls: $(tail -n 3 "$DIR/consumer.log")"
log "consumer: $(tail -n 1 "$DIR/consumer.log")"

if [ -n "$PLOT" ]; then
  END=$(date +%s)
  sleep 2 # the last scrape
  range() {
    curl -fsS --get "http://127.0.0.1:$PROM_PORT/api/v1/query_range" \
      --data-urlencode "query=$1" --data-urlencode "start=$START" \
      --data-urlencode "end=$END" --data-urlencode "step=1"
  }
  range "sum(rate(rpc_client_calls_total{$SEL,rpc_response_status_code=\"OK\"}[2s]))" >"$DIR/qps.json"
  range "sum(rate(rpc_client_calls_total{$SEL,rpc_response_status_code!=\"OK\"}[2s]))" >"$DIR/errors.json"
  range "histogram_quantile(0.99, sum by (le) (rate(rpc_client_call_duration_seconds_bucket{$SEL}[2s])))" >"$DIR/p99.json"
  range 'sum(rpc_client_instances{rpc_service="UserService:1.0"})' >"$DIR/instances.json"
  "$PY" scripts/plot-observability.py "$DIR" "$START" "$KILLED" "$RESTARTED" "$PLOT"
  log "wrote $PLOT"
fi
log "ok"
