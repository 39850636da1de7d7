#!/usr/bin/env bash
# Apache Kafka in KRaft mode, one broker on loopback, without Docker.
# Uses $KAFKA_HOME when it points at an installation, else the release tarball, else the
# broker's jars from Maven Central. Usage: kafka.sh start|stop|status
# KAFKA_PORT, KAFKA_CONTROLLER_PORT and KAFKA_INSTANCE may be overridden (tests run a second broker).
# Sourced (by kafka-cluster.sh) it only defines its functions, for brokers of a cluster.
SERVICE=${SERVICE:-kafka}
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HOME_DIR="$STATE/kafka"
LIBS="$HOME_DIR/libs-$KAFKA_VERSION"

# use_instance NAME: the broker the functions below act on (its data, pid file, log and config).
use_instance() {
  INSTANCE=$1
  DATA="$HOME_DIR/data-$INSTANCE"
  PIDFILE="$STATE/run/kafka-$INSTANCE.pid"
  LOG="$STATE/log/kafka-$INSTANCE.log"
  CONFIG="$HOME_DIR/server-$INSTANCE.properties"
}
use_instance "${KAFKA_INSTANCE:-main}"
declare -A LOG_FROM  # instance -> the byte of its log where its last launch began

classpath() {
  if [ -n "${KAFKA_HOME:-}" ] && [ -d "$KAFKA_HOME/libs" ]; then echo "$KAFKA_HOME/libs/*"; else echo "$LIBS/*"; fi
}

fetch_tarball() {
  local name="kafka_${SCALA_VERSION}-${KAFKA_VERSION}" tmp
  tmp=$(mktemp -d)
  say "trying the release tarball $name.tgz"
  if curl -fsSL --connect-timeout 3 --max-time 300 -o "$tmp/k.tgz" \
      "https://archive.apache.org/dist/kafka/$KAFKA_VERSION/$name.tgz" 2>/dev/null \
     && tar -xzf "$tmp/k.tgz" -C "$tmp"; then
    mkdir -p "$LIBS" && cp "$tmp/$name/libs/"*.jar "$LIBS/"
    rm -rf "$tmp"; return 0
  fi
  rm -rf "$tmp"; return 1
}

fetch_maven() {
  have mvn || die "neither the release tarball nor Maven is available to fetch Kafka" \
    "install Maven (apt-get install maven), or set KAFKA_HOME to an unpacked Kafka $KAFKA_VERSION"
  say "fetching the broker's jars (kafka_$SCALA_VERSION $KAFKA_VERSION and runtime dependencies) with Maven"
  local pom="$HOME_DIR/pom.xml"
  sed -e "s/@KAFKA_VERSION@/$KAFKA_VERSION/g" -e "s/@SCALA_VERSION@/$SCALA_VERSION/g" \
    "$ROOT/deploy/local/kafka-pom.xml" > "$pom"
  mvn -q -B -f "$pom" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$LIBS.partial" >"$STATE/log/kafka-maven.log" 2>&1 \
    || die "Maven could not fetch Kafka's jars (no network to Maven Central?)" \
           "see $STATE/log/kafka-maven.log; or set KAFKA_HOME to an unpacked Kafka $KAFKA_VERSION"
  mv "$LIBS.partial" "$LIBS"
}

install() {
  if [ -n "${KAFKA_HOME:-}" ] && [ -d "$KAFKA_HOME/libs" ]; then say "using KAFKA_HOME=$KAFKA_HOME"; return; fi
  [ -d "$LIBS" ] && return
  mkdir -p "$HOME_DIR"
  fetch_tarball || fetch_maven
  say "Kafka $KAFKA_VERSION jars cached in $LIBS"
}

write_config() {
  mkdir -p "$HOME_DIR"
  cat > "$HOME_DIR/server-$INSTANCE.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$DATA
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.cleaner.backoff.ms=1000
PROPS
}

require_java() {
  have java || die "Java is not installed; Kafka needs Java 17 or newer" "apt-get install openjdk-17-jre-headless"
}

# launch [CLUSTER_ID]: format the storage on first use and start the JVM, without waiting for it.
# The brokers of one cluster share a cluster id; a lone broker makes its own.
launch() {
  ensure_port_free "$KAFKA_PORT" "Kafka"
  ensure_port_free "$KAFKA_CONTROLLER_PORT" "Kafka's controller"
  local cp; cp=$(classpath)
  if [ ! -f "$DATA/meta.properties" ]; then
    say "formatting KRaft storage in $DATA"
    java -cp "$cp" -Dlog4j2.configurationFile="$ROOT/deploy/local/kafka-log4j2.yaml" kafka.tools.StorageTool format \
      -t "${1:-$(java -cp "$cp" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)}" \
      -c "$CONFIG" >>"$LOG" 2>&1 || die "formatting Kafka storage failed" "see $LOG"
  fi
  say "starting broker on 127.0.0.1:$KAFKA_PORT (heap $KAFKA_HEAP, log $LOG)"
  LOG_FROM[$INSTANCE]=$(( $(stat -c %s "$LOG" 2>/dev/null || echo 0) + 1 ))
  nohup java -Xms256m -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$ROOT/deploy/local/kafka-log4j2.yaml" \
    -cp "$cp" kafka.Kafka "$CONFIG" >>"$LOG" 2>&1 &
  echo $! > "$PIDFILE"
}

# await_ready SECONDS: until the broker says it started since its launch, or fail pointing at its log.
await_ready() {
  wait_port "$KAFKA_PORT" "$1" "$LOG"
  for _ in $(seq 1 $(( $1 * 5 ))); do
    grep -q "Kafka Server started" < <(tail -c +"${LOG_FROM[$INSTANCE]}" "$LOG") && return 0
    pid_alive "$PIDFILE" || die "Kafka exited during start-up" "see $LOG"
    sleep 0.2
  done
  die "Kafka did not finish starting within $1 s" "see $LOG"
}

start() {
  if pid_alive "$PIDFILE"; then say "already running (pid $(cat "$PIDFILE")) on 127.0.0.1:$KAFKA_PORT"; return; fi
  require_java
  install
  write_config
  launch
  await_ready 90
  say "ready on 127.0.0.1:$KAFKA_PORT"
}

[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

case "${1:-start}" in
  start) start ;;
  stop) stop_pidfile "$PIDFILE" "Kafka ($INSTANCE)" ;;
  status) pid_alive "$PIDFILE" && say "running (pid $(cat "$PIDFILE"))" || { say "stopped"; exit 1; } ;;
  reset) stop_pidfile "$PIDFILE" "Kafka ($INSTANCE)"; rm -rf "$DATA"; say "data of $INSTANCE removed" ;;
  *) die "unknown command $1" "use start, stop, status or reset" ;;
esac
