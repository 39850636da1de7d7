#!/usr/bin/env bash
# The project's virtual environment in .venv, with Tally and its test tools installed.
# Re-installs only when pyproject.toml changed. Usage: python.sh
SERVICE=python
. "$(dirname "$0")/common.sh"

PY="${PYTHON:-python3}"
have "$PY" || die "python3 is not installed" "install Python 3.11 or newer (apt-get install python3 python3-venv)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "Python 3.11 or newer is needed, found $("$PY" --version 2>&1)" "install Python 3.11+ or set PYTHON=/path/to/python3.11"

VENV="$ROOT/.venv"
STAMP="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ -f "$STAMP" ]; then say "virtual environment is up to date ($VENV)"; exit 0; fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment in $VENV"
  "$PY" -m venv "$VENV" 2>"$STATE/log/venv.log" || { apt_install python3-venv; "$PY" -m venv "$VENV"; }
fi
say "installing Tally and its dependencies from PyPI (about a minute the first time)"
"$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip >"$STATE/log/pip.log" 2>&1 || true
"$VENV/bin/pip" install --disable-pip-version-check -e "$ROOT[test]" >>"$STATE/log/pip.log" 2>&1 \
  || die "pip could not install the dependencies (no network to PyPI?)" "see $STATE/log/pip.log"
rm -f "$VENV"/.installed-*
touch "$STAMP"
say "ready: $VENV"
