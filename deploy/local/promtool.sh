#!/usr/bin/env bash
# promtool, Prometheus' checker, built from its Go module into .local/bin (the metrics test runs it).
# Idempotent: an existing binary is kept. Usage: promtool.sh
SERVICE=promtool
. "$(dirname "$0")/common.sh"

BIN_DIR="$STATE/bin"
BIN="$BIN_DIR/promtool-$PROMETHEUS_VERSION"
BUILD="$STATE/build/promtool-$PROMETHEUS_VERSION"

[ -x "$BIN" ] && { say "promtool $PROMETHEUS_VERSION present"; exit 0; }
have go || die "Go is not installed; promtool is built from its Go module" "install Go 1.24+ (apt-get install golang)"
say "building promtool $PROMETHEUS_VERSION with go install"
# A small module of our own, because the release's go.mod pins one dependency (Nomad's API client) at a
# version the module proxy does not serve: replace it with one it does. promtool does not use Nomad.
mkdir -p "$BUILD" "$BIN_DIR"
cat > "$BUILD/go.mod" <<MOD
module promtoolbuild

go 1.24

require github.com/prometheus/prometheus $PROMETHEUS_VERSION

replace github.com/hashicorp/nomad/api => github.com/hashicorp/nomad/api $PROMETHEUS_NOMAD_API
MOD
printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/prometheus/prometheus/cmd/promtool"\n' > "$BUILD/tools.go"
(cd "$BUILD" && go mod tidy && GOBIN="$BUILD/bin" go install github.com/prometheus/prometheus/cmd/promtool) \
  >"$STATE/log/promtool-build.log" 2>&1 \
  || die "go install of promtool failed (no network to the Go module proxy?)" "see $STATE/log/promtool-build.log"
mv "$BUILD/bin/promtool" "$BIN"
say "promtool at $BIN"
