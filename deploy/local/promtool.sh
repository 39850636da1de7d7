#!/usr/bin/env bash
# promtool, Prometheus' checker, built from its Go module into .local/bin (the metrics test runs it).
# Idempotent: an existing binary is kept. Usage: promtool.sh
SERVICE=promtool
. "$(dirname "$0")/common.sh"

# A small module of our own, because the release's go.mod pins one dependency (Nomad's API client) at a
# version the module proxy does not serve: replace it with one it does. promtool does not use Nomad.
module() {
  cat > "$1/go.mod" <<MOD
module promtoolbuild

go 1.24

require github.com/prometheus/prometheus $PROMETHEUS_VERSION

replace github.com/hashicorp/nomad/api => github.com/hashicorp/nomad/api $PROMETHEUS_NOMAD_API
MOD
  printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/prometheus/prometheus/cmd/promtool"\n' > "$1/tools.go"
}

go_tool promtool "$PROMETHEUS_VERSION" github.com/prometheus/prometheus/cmd/promtool module
