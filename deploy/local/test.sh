#!/usr/bin/env bash
# The whole test suite against real Kafka, PostgreSQL and Redis, started here if they are not up.
# Extra arguments go to pytest (e.g. -k gateway, -x).
SERVICE=test
. "$(dirname "$0")/common.sh"

bash "$ROOT/deploy/local/services.sh"
bash "$ROOT/deploy/local/promtool.sh" || say "promtool could not be built; the metrics check will say so and skip"
say "running the test suite"
bash "$ROOT/deploy/local/helm.sh" && bash "$ROOT/deploy/local/kubeconform.sh" && bash "$ROOT/deploy/local/prometheus.sh" || say "helm, kubeconform or prometheus could not be set up; their tests will say why"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
