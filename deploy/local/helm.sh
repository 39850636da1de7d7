#!/usr/bin/env bash
# helm, built from its Go module into .local/bin (the chart test lints and renders deploy/helm/tally with it).
# Idempotent: an existing binary is kept. Usage: helm.sh
SERVICE=helm
. "$(dirname "$0")/common.sh"

BIN_DIR="$STATE/bin"
BIN="$BIN_DIR/helm-$HELM_VERSION"
BUILD="$STATE/build/helm-$HELM_VERSION"

[ -x "$BIN" ] && { say "helm $HELM_VERSION present"; exit 0; }
have go || die "Go is not installed; helm is built from its Go module" "install Go 1.26+ (apt-get install golang)"
say "building helm $HELM_VERSION with go install"
mkdir -p "$BUILD" "$BIN_DIR"
GOBIN="$BUILD/bin" go install "helm.sh/helm/v4/cmd/helm@$HELM_VERSION" >"$STATE/log/helm-build.log" 2>&1 \
  || die "go install of helm failed (no network to the Go module proxy?)" "see $STATE/log/helm-build.log"
mv "$BUILD/bin/helm" "$BIN"
say "helm at $BIN"
