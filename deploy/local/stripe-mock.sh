#!/usr/bin/env bash
# stripe-mock, Stripe's official mock of its API, built from its Go module, on 127.0.0.1:$STRIPE_MOCK_PORT.
# Usage: stripe-mock.sh start|stop|status
SERVICE=stripe-mock
. "$(dirname "$0")/common.sh"

PIDFILE="$STATE/run/stripe-mock.pid"
LOG="$STATE/log/stripe-mock.log"
BIN_DIR="$STATE/bin"
BIN="$BIN_DIR/stripe-mock-$STRIPE_MOCK_VERSION"

install() {
  [ -x "$BIN" ] && return
  have go || die "Go is not installed; stripe-mock is built from its Go module" "install Go 1.22+ (apt-get install golang)"
  say "building stripe-mock $STRIPE_MOCK_VERSION with go install"
  mkdir -p "$BIN_DIR"
  GOBIN="$BIN_DIR.tmp" go install "github.com/stripe/stripe-mock@$STRIPE_MOCK_VERSION" >"$STATE/log/stripe-mock-build.log" 2>&1 \
    || die "go install of stripe-mock failed (no network to the Go module proxy?)" "see $STATE/log/stripe-mock-build.log"
  mv "$BIN_DIR.tmp/stripe-mock" "$BIN" && rmdir "$BIN_DIR.tmp"
}

start() {
  install
  if pid_alive "$PIDFILE"; then say "already running (pid $(cat "$PIDFILE")) on 127.0.0.1:$STRIPE_MOCK_PORT"; return; fi
  ensure_port_free "$STRIPE_MOCK_PORT" "stripe-mock"
  say "starting on 127.0.0.1:$STRIPE_MOCK_PORT (log $LOG)"
  nohup "$BIN" -http-addr "127.0.0.1:$STRIPE_MOCK_PORT" -https-addr "127.0.0.1:$((STRIPE_MOCK_PORT + 1))" >>"$LOG" 2>&1 &
  echo $! > "$PIDFILE"
  wait_port "$STRIPE_MOCK_PORT" 30 "$LOG"
  say "ready on 127.0.0.1:$STRIPE_MOCK_PORT"
}

case "${1:-start}" in
  start) start ;;
  stop) stop_pidfile "$PIDFILE" "stripe-mock" ;;
  status) pid_alive "$PIDFILE" && say "running (pid $(cat "$PIDFILE"))" || { say "stopped"; exit 1; } ;;
  *) die "unknown command $1" "use start, stop or status" ;;
esac
