#!/usr/bin/env bash
# Tally's own processes (gateway, processor, jobs worker, alert evaluator) under supervisord, which starts
# again any that exits (deploy/local/supervisord.conf, docs/adr/0085). The backing services are services.sh's.
# Idempotent: `start` leaves running processes alone and starts only those not running.
# Usage: apps.sh start|stop|status|ctl ARGS (ctl passes ARGS to supervisorctl: ctl restart jobs, ctl tail -f gateway)
SERVICE=apps
. "$(dirname "$0")/common.sh"

export TALLY_STATE_DIR="$STATE"
# The interpreter that runs supervisord and `python -m tally.cli`; tests point it at their own.
export APPS_PYTHON="${APPS_PYTHON:-$ROOT/.venv/bin/python}"
CONF="$ROOT/deploy/local/supervisord.conf"
PIDFILE="$STATE/run/supervisord.pid"
SECRETS="$STATE/secrets.env"

ctl() { "$APPS_PYTHON" -m supervisor.supervisorctl -c "$CONF" "$@"; }

# The secrets secrets.sh made once, for every process; a variable set in the environment wins.
secrets() {
  bash "$ROOT/deploy/local/secrets.sh" "$SECRETS" | while read -r line; do say "$line"; done
  local line key
  while read -r line; do
    key=${line%%=*}
    [ -n "${!key:-}" ] || export "$line"
  done < "$SECRETS"
}

start() {
  secrets
  if pid_alive "$PIDFILE"; then
    say "supervisord already running (pid $(cat "$PIDFILE")); starting only processes that are not running"
    ctl start all >/dev/null || true
  else
    ensure_port_free "$TALLY_GATEWAY_PORT" "the gateway"
    say "starting supervisord with the gateway, processor, jobs worker and alert evaluator (logs in $STATE/log)"
    "$APPS_PYTHON" -m supervisor.supervisord -c "$CONF" \
      || die "supervisord did not start" "see $STATE/log/supervisord.log"
  fi
  for _ in $(seq 1 150); do
    curl -fsS "http://127.0.0.1:$TALLY_GATEWAY_PORT/healthz" >/dev/null 2>&1 && { say "gateway ready on http://127.0.0.1:$TALLY_GATEWAY_PORT"; return; }
    pid_alive "$PIDFILE" || die "supervisord exited during start-up" "see $STATE/log/supervisord.log"
    sleep 0.2
  done
  die "the gateway did not answer within 30 s" "see $STATE/log/gateway.log, and \`tally status\`"
}

stop() {
  if ! pid_alive "$PIDFILE"; then say "supervisord is not running"; rm -f "$PIDFILE"; return; fi
  local pid; pid=$(cat "$PIDFILE")
  say "stopping supervisord (pid $pid) and the processes it runs"
  kill "$pid"
  # each process gets its stopwaitsecs (30 s) before a SIGKILL; supervisord leaves after the last one
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || { rm -f "$PIDFILE"; return; }; sleep 0.2; done
  die "supervisord (pid $pid) did not stop within 60 s" "see $STATE/log/supervisord.log"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) cd "$ROOT" && "$APPS_PYTHON" -m tally.cli status ;;
  ctl) shift; ctl "$@" ;;
  *) die "unknown command $1" "use start, stop, status or ctl (supervisorctl's commands, e.g. ctl restart jobs)" ;;
esac
