#!/usr/bin/env bash
# The whole test suite against real Kafka, PostgreSQL and Redis, started here if they are not up, with every
# real component the tests use installed first: promtool for the metrics check, Debian's Chromium for the usage
# page's browser test. A test skipped for a reason the project could cure fails (tests/conftest.py).
# Extra arguments go to pytest (e.g. -k gateway, -x).
SERVICE=test
. "$(dirname "$0")/common.sh"

bash "$ROOT/deploy/local/services.sh"
bash "$ROOT/deploy/local/promtool.sh" || say "promtool could not be built; the metrics check will fail and say why"
bash "$ROOT/deploy/local/chromium.sh" || say "chromium could not be installed; the usage page's browser test will say why"
say "running the test suite"
bash "$ROOT/deploy/local/helm.sh" && bash "$ROOT/deploy/local/kubeconform.sh" && bash "$ROOT/deploy/local/prometheus.sh" || say "helm, kubeconform or prometheus could not be set up; their tests will say why"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
