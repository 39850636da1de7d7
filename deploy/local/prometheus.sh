#!/usr/bin/env bash
# Prometheus itself, from Debian's package, for the test that runs it against the Tally processes with
# the alert rules (tests/test_prometheus_live.py). Idempotent: an installed binary is kept. Usage: prometheus.sh
SERVICE=prometheus
. "$(dirname "$0")/common.sh"

have prometheus && { say "prometheus present ($(command -v prometheus))"; exit 0; }
apt_install prometheus
have prometheus || die "the prometheus package installed no prometheus binary" "see $STATE/log/apt.log"
say "prometheus at $(command -v prometheus)"
