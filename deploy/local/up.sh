#!/usr/bin/env bash
# The whole pipeline on this machine: services, migrations, topics, gateway, processor, the billing
# jobs worker and the alert evaluator, then a demo that posts a few events and prints them persisted.
# Idempotent. Stop it with down.sh.
SERVICE=tally
. "$(dirname "$0")/common.sh"
HERE="$ROOT/deploy/local"

bash "$HERE/services.sh"

start_app() {
  local name=$1; shift
  local pidfile="$STATE/run/$name.pid" log="$STATE/log/$name.log"
  if pid_alive "$pidfile"; then say "$name already running (pid $(cat "$pidfile"))"; return; fi
  say "starting $name (log $log)"
  nohup "$ROOT/.venv/bin/tally" "$@" >>"$log" 2>&1 &
  echo $! > "$pidfile"
}

pid_alive "$STATE/run/gateway.pid" || ensure_port_free "$GATEWAY_PORT" "the gateway"
start_app gateway gateway --port "$GATEWAY_PORT"
start_app processor process
start_app jobs jobs
start_app alerts alerts
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$GATEWAY_PORT/healthz" >/dev/null 2>&1 && break
  pid_alive "$STATE/run/gateway.pid" || die "the gateway exited during start-up" "see $STATE/log/gateway.log"
  sleep 0.2
done
say "gateway ready on http://127.0.0.1:$GATEWAY_PORT"

say "demo: posting events and waiting for them in PostgreSQL"
"$ROOT/.venv/bin/tally" demo --url "http://127.0.0.1:$GATEWAY_PORT" \
  || die "the demo did not see its events persisted" "see $STATE/log/gateway.log and $STATE/log/processor.log"
say "the pipeline is up. Stop everything with: bash deploy/local/down.sh"
