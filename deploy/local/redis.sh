#!/usr/bin/env bash
# Redis from Debian's packages, run by us on 127.0.0.1:$REDIS_PORT (not the system unit, so it
# works without systemd). Past maxmemory it refuses writes rather than evicting the gateway's state
# (noeviction, docs/adr/0005). Usage: redis.sh start|stop|status
SERVICE=redis
. "$(dirname "$0")/common.sh"

PIDFILE="$STATE/run/redis.pid"
LOG="$STATE/log/redis.log"

start() {
  have redis-server || apt_install redis-server
  if pid_alive "$PIDFILE"; then say "already running (pid $(cat "$PIDFILE")) on 127.0.0.1:$REDIS_PORT"; return; fi
  ensure_port_free "$REDIS_PORT" "Redis"
  mkdir -p "$STATE/redis"
  say "starting on 127.0.0.1:$REDIS_PORT (log $LOG)"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes --pidfile "$PIDFILE" \
    --logfile "$LOG" --dir "$STATE/redis" --save "" --appendonly no --maxmemory "$REDIS_MAXMEMORY" \
    --maxmemory-policy "$REDIS_MAXMEMORY_POLICY" || die "redis-server did not start" "see $LOG"
  wait_port "$REDIS_PORT" 20 "$LOG"
  for _ in $(seq 1 25); do [ -s "$PIDFILE" ] && break; sleep 0.2; done
  say "ready on 127.0.0.1:$REDIS_PORT"
}

case "${1:-start}" in
  start) start ;;
  stop) stop_pidfile "$PIDFILE" "Redis" ;;
  status) pid_alive "$PIDFILE" && say "running (pid $(cat "$PIDFILE"))" || { say "stopped"; exit 1; } ;;
  *) die "unknown command $1" "use start, stop or status" ;;
esac
