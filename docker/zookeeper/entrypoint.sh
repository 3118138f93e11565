#!/bin/sh
# One ZooKeeper ensemble member in the foreground, configured from the
# environment:
#   ZOO_MY_ID        this member's id (1-based position in ZOO_SERVERS)
#   ZOO_SERVERS      "host:peerPort:electionPort ..." for every member, in id order
#   ZOO_CLIENT_PORT  client port (default 2181)
#   ZOO_DATA_DIR     data directory (default /var/lib/zookeeper)
#   ZOO_TICK_TIME    tick in ms (default 2000: session timeouts from 4 s to 40 s)
#   ZOO_LISTEN_ALL   listen on every interface (default true; false binds to the
#                    addresses in ZOO_SERVERS and ZOO_CLIENT_ADDRESS, for loopback runs)
#   ZOO_CLIENT_ADDRESS  client address when ZOO_LISTEN_ALL=false
set -eu
: "${ZOO_MY_ID:?set ZOO_MY_ID}"
: "${ZOO_SERVERS:?set ZOO_SERVERS}"
data=${ZOO_DATA_DIR:-/var/lib/zookeeper}
cfg=$data/zoo.cfg
mkdir -p "$data"
echo "$ZOO_MY_ID" >"$data/myid"
{
  echo "tickTime=${ZOO_TICK_TIME:-2000}"
  echo "initLimit=10"
  echo "syncLimit=5"
  echo "dataDir=$data"
  echo "clientPort=${ZOO_CLIENT_PORT:-2181}"
  echo "admin.enableServer=false"
  echo "4lw.commands.whitelist=ruok,srvr,stat,mntr"
  if [ "${ZOO_LISTEN_ALL:-true}" = true ]; then
    echo "quorumListenOnAllIPs=true"
  else
    echo "clientPortAddress=${ZOO_CLIENT_ADDRESS:-127.0.0.1}"
  fi
  i=1
  for member in $ZOO_SERVERS; do
    echo "server.$i=$member"
    i=$((i + 1))
  done
} >"$cfg"
exec java ${JAVA_OPTS:--Xmx512m} \
  -cp /usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar \
  org.apache.zookeeper.server.quorum.QuorumPeerMain "$cfg"
