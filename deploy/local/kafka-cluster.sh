#!/usr/bin/env bash
# Three Kafka brokers in KRaft mode on loopback, each also a controller of the cluster's quorum, beside
# the single broker of kafka.sh (which stays the default; this leaves it alone).
# Usage: kafka-cluster.sh start|stop|status|reset|bootstrap
#   start      start the brokers not running (all three at first), wait until each says it started
#   stop       stop all three (data stays); reset also removes their data
#   bootstrap  print the bootstrap servers, for TALLY_KAFKA_BOOTSTRAP
# Topics on it: TALLY_TOPIC_REPLICATION_FACTOR=3 TALLY_TOPIC_MIN_INSYNC_REPLICAS=2 (the brokers' defaults
# are the same), so an acks=all write is acknowledged once two copies have it.
# KAFKA_CLUSTER_PORTS, KAFKA_CLUSTER_CONTROLLER_PORTS and KAFKA_CLUSTER_HEAP may be overridden.
SERVICE=kafka-cluster
. "$(dirname "$0")/kafka.sh"

read -r -a PORTS <<<"${KAFKA_CLUSTER_PORTS:-19092 19093 19094}"
read -r -a CONTROLLER_PORTS <<<"${KAFKA_CLUSTER_CONTROLLER_PORTS:-19192 19193 19194}"
KAFKA_HEAP="${KAFKA_CLUSTER_HEAP:-384m}"
CLUSTER_ID_FILE="$HOME_DIR/cluster-id"
NODES="1 2 3"

# node N: point kafka.sh's functions at broker N (1-3).
node() {
  use_instance "cluster-$1"
  KAFKA_PORT=${PORTS[$1 - 1]}
  KAFKA_CONTROLLER_PORT=${CONTROLLER_PORTS[$1 - 1]}
}

voters() {
  local n out=""
  for n in $NODES; do out+="${out:+,}$n@127.0.0.1:${CONTROLLER_PORTS[$n - 1]}"; done
  echo "$out"
}

bootstrap() {
  local n out=""
  for n in $NODES; do out+="${out:+,}127.0.0.1:${PORTS[$n - 1]}"; done
  echo "$out"
}

# kafka.sh's single-broker settings, then what makes this a cluster (later keys win).
write_node_config() {
  write_config
  cat >> "$CONFIG" <<PROPS
node.id=$1
controller.quorum.voters=$(voters)
num.partitions=12
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
# a killed broker is fenced, and its partitions led by another, within seconds
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=6000
replica.lag.time.max.ms=10000
PROPS
}

start_all() {
  require_java
  install
  [ -f "$CLUSTER_ID_FILE" ] || java -cp "$(classpath)" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1 \
    > "$CLUSTER_ID_FILE"
  local n launched=""
  for n in $NODES; do
    node "$n"
    if pid_alive "$PIDFILE"; then say "broker $n already running (pid $(cat "$PIDFILE"))"; continue; fi
    write_node_config "$n"
    launch "$(cat "$CLUSTER_ID_FILE")"
    launched+=" $n"
  done
  # A broker finishes starting only once a majority of the controllers runs: launch all, then wait.
  for n in $launched; do node "$n"; await_ready 180; done
  say "ready: $(bootstrap)"
}

stop_all() {
  local n
  # At once: stopped one by one, the last broker's controlled shutdown would wait for a quorum that is gone.
  for n in $NODES; do (node "$n"; stop_pidfile "$PIDFILE" "broker $n") & done
  wait
}

status_all() {
  local n down=0
  for n in $NODES; do
    node "$n"
    if pid_alive "$PIDFILE"; then say "broker $n running (pid $(cat "$PIDFILE")) on 127.0.0.1:$KAFKA_PORT"
    else say "broker $n stopped"; down=1; fi
  done
  return $down
}

case "${1:-start}" in
  start) start_all ;;
  stop) stop_all ;;
  status) status_all ;;
  reset) stop_all; for n in $NODES; do node "$n"; rm -rf "$DATA"; done; rm -f "$CLUSTER_ID_FILE"
         say "the cluster's data removed" ;;
  bootstrap) bootstrap ;;
  *) die "unknown command $1" "use start, stop, status, reset or bootstrap" ;;
esac
