#!/usr/bin/env bash
# kubeconform, the Kubernetes manifest checker, built from its Go module into .local/bin (the chart test
# checks helm's output with it against the schemas vendored in deploy/helm/schemas/).
# Idempotent: an existing binary is kept. Usage: kubeconform.sh
SERVICE=kubeconform
. "$(dirname "$0")/common.sh"

BIN_DIR="$STATE/bin"
BIN="$BIN_DIR/kubeconform-$KUBECONFORM_VERSION"
BUILD="$STATE/build/kubeconform-$KUBECONFORM_VERSION"

[ -x "$BIN" ] && { say "kubeconform $KUBECONFORM_VERSION present"; exit 0; }
have go || die "Go is not installed; kubeconform is built from its Go module" "install Go 1.24+ (apt-get install golang)"
say "building kubeconform $KUBECONFORM_VERSION with go install"
mkdir -p "$BUILD" "$BIN_DIR"
GOBIN="$BUILD/bin" go install "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION" \
  >"$STATE/log/kubeconform-build.log" 2>&1 \
  || die "go install of kubeconform failed (no network to the Go module proxy?)" "see $STATE/log/kubeconform-build.log"
mv "$BUILD/bin/kubeconform" "$BIN"
say "kubeconform at $BIN"
