#!/usr/bin/env bash
# kubeconform, the Kubernetes manifest checker, built from its Go module into .local/bin (the chart test
# checks helm's output with it against the schemas vendored in deploy/helm/schemas/).
# Idempotent: an existing binary is kept. Usage: kubeconform.sh
SERVICE=kubeconform
. "$(dirname "$0")/common.sh"

go_tool kubeconform "$KUBECONFORM_VERSION" github.com/yannh/kubeconform/cmd/kubeconform
