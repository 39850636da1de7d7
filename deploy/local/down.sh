#!/usr/bin/env bash
# Stop every process up.sh started: supervisord and Tally's processes, then the services. Data stays;
# `kafka.sh reset` removes the broker's.
SERVICE=tally
. "$(dirname "$0")/common.sh"
HERE="$ROOT/deploy/local"

bash "$HERE/apps.sh" stop
bash "$HERE/stripe-mock.sh" stop
bash "$HERE/redis.sh" stop
bash "$HERE/kafka.sh" stop
bash "$HERE/kafka-cluster.sh" stop
bash "$HERE/postgres.sh" stop
