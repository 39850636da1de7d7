#!/usr/bin/env bash
# Start the backing services (Kafka, PostgreSQL, Redis, stripe-mock), apply migrations, create topics.
# Idempotent: what runs already is left alone. Usage: services.sh
SERVICE=stack
. "$(dirname "$0")/common.sh"
HERE="$ROOT/deploy/local"

step() {
  local name=$1; shift
  local t0=$SECONDS
  "$@"
  say "$name took $((SECONDS - t0))s"
}

step "python" bash "$HERE/python.sh"
step "postgres" bash "$HERE/postgres.sh" start
step "redis" bash "$HERE/redis.sh" start
step "kafka" bash "$HERE/kafka.sh" start
step "stripe-mock" bash "$HERE/stripe-mock.sh" start
step "migrations" "$ROOT/.venv/bin/tally" migrate
step "topics" "$ROOT/.venv/bin/tally" topics create
