#!/usr/bin/env bash
# The whole pipeline on this machine: services, migrations, topics, then the gateway, processor, the billing
# jobs worker and the alert evaluator under supervisord (apps.sh), which restarts any of them that exits;
# then a demo that posts a few events and prints them persisted, and `tally status`.
# Idempotent: run again, it starts only what is not running. Stop it with down.sh.
SERVICE=tally
. "$(dirname "$0")/common.sh"
HERE="$ROOT/deploy/local"

bash "$HERE/services.sh"
bash "$HERE/apps.sh" start

say "demo: posting events and waiting for them in PostgreSQL"
"$ROOT/.venv/bin/tally" demo --url "http://127.0.0.1:$GATEWAY_PORT" \
  || die "the demo did not see its events persisted" "see $STATE/log/gateway.log and $STATE/log/processor.log"
# supervisord calls a process RUNNING once it has stayed up startsecs (10 s): show the status after that.
for _ in $(seq 1 40); do bash "$HERE/apps.sh" ctl status 2>/dev/null | grep -q STARTING || break; sleep 0.5; done
bash "$HERE/apps.sh" status || say "a process is not healthy yet: see its log in $STATE/log, or run .venv/bin/tally status again"
say "the pipeline is up. Stop everything with: bash deploy/local/down.sh"
