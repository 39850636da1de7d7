#!/usr/bin/env bash
# helm, built from its Go module into .local/bin (the chart test lints and renders deploy/helm/tally with it).
# Idempotent: an existing binary is kept. Usage: helm.sh
SERVICE=helm
. "$(dirname "$0")/common.sh"

go_tool helm "$HELM_VERSION" helm.sh/helm/v4/cmd/helm
