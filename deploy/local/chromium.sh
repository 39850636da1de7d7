#!/usr/bin/env bash
# Debian's Chromium for the usage page's browser test (Playwright drives it through executable_path;
# nothing is downloaded from a browser CDN). Idempotent. Usage: chromium.sh
SERVICE=chromium
. "$(dirname "$0")/common.sh"

if have chromium; then say "chromium is installed ($(command -v chromium))"; exit 0; fi
apt_install chromium
have chromium || die "chromium is still missing after apt-get install" "see $STATE/log/apt.log"
say "ready: $(command -v chromium)"
