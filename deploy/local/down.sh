#!/usr/bin/env bash
# Stop every process up.sh started. Data stays; `kafka.sh reset` removes the broker's.
SERVICE=tally
. "$(dirname "$0")/common.sh"
HERE="$ROOT/deploy/local"

stop_pidfile "$STATE/run/alerts.pid" "alert evaluator"
stop_pidfile "$STATE/run/jobs.pid" "jobs worker"
stop_pidfile "$STATE/run/processor.pid" "processor"
stop_pidfile "$STATE/run/gateway.pid" "gateway"
bash "$HERE/stripe-mock.sh" stop
bash "$HERE/redis.sh" stop
bash "$HERE/kafka.sh" stop
bash "$HERE/kafka-cluster.sh" stop
bash "$HERE/postgres.sh" stop
