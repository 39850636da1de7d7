# Shared helpers for the local stack scripts. Sourced, never run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# versions.env gives defaults; a variable already set in the environment wins (tests run a second broker).
while IFS='=' read -r key value; do
  [[ $key =~ ^[A-Z_]+$ ]] || continue
  [ -n "${!key:-}" ] || export "$key=$value"
done < "$ROOT/deploy/local/versions.env"
# Tally's own processes follow the ports chosen here unless told otherwise.
export TALLY_KAFKA_BOOTSTRAP="${TALLY_KAFKA_BOOTSTRAP:-127.0.0.1:$KAFKA_PORT}"
export TALLY_DATABASE_URL="${TALLY_DATABASE_URL:-postgresql://$POSTGRES_USER:$POSTGRES_PASSWORD@127.0.0.1:$POSTGRES_PORT/$POSTGRES_DB?sslmode=disable}"
export TALLY_REDIS_URL="${TALLY_REDIS_URL:-redis://127.0.0.1:$REDIS_PORT/0}"
export TALLY_STRIPE_API_BASE="${TALLY_STRIPE_API_BASE:-http://127.0.0.1:$STRIPE_MOCK_PORT}"
export TALLY_GATEWAY_PORT="${TALLY_GATEWAY_PORT:-$GATEWAY_PORT}"
STATE="${TALLY_STATE_DIR:-$ROOT/.local}"
mkdir -p "$STATE/log" "$STATE/run"

say()  { printf '\033[1m[%s]\033[0m %s\n' "${SERVICE:-tally}" "$*"; }
die()  { printf '\033[31m[%s] error:\033[0m %s\n' "${SERVICE:-tally}" "$1" >&2; [ $# -gt 1 ] && printf '  what to do: %s\n' "$2" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_port PORT SECONDS LOGFILE: wait until something listens, or fail pointing at the log.
wait_port() {
  local port=$1 secs=$2 log=${3:-}
  for _ in $(seq 1 $((secs * 5))); do
    port_open "$port" && return 0
    sleep 0.2
  done
  die "nothing listens on 127.0.0.1:$port after ${secs}s" "read ${log:-the service log} for the cause"
}

# ensure_port_free PORT WHAT: a port taken by a stranger is a clear error, not a hang.
ensure_port_free() {
  port_open "$1" && die "port $1 is already taken by another process, so $2 cannot start" \
    "stop whatever listens there (ss -ltnp 'sport = :$1') or change the port in deploy/local/versions.env"
  return 0
}

apt_updated=""
apt_install() {
  have apt-get || die "apt-get is missing; cannot install $*" "install $* with your system's package manager"
  if [ -z "$apt_updated" ]; then
    say "apt-get update (once)"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >"$STATE/log/apt.log" 2>&1 \
      || die "apt-get update failed (no network to Debian's mirrors?)" "check the network, then see $STATE/log/apt.log"
    apt_updated=1
  fi
  say "installing $* from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >>"$STATE/log/apt.log" 2>&1 \
    || die "apt-get install $* failed" "see $STATE/log/apt.log"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {
  local pidfile=$1 name=$2
  if pid_alive "$pidfile"; then
    local pid; pid=$(cat "$pidfile")
    say "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  else
    say "$name is not running"
  fi
  rm -f "$pidfile"
}

# go_tool NAME VERSION PACKAGE [PREPARE]: NAME built from its Go module into $STATE/bin/NAME-VERSION, once.
# PREPARE, a function, may first write a module of its own into the build directory (its argument), from
# which PACKAGE is installed; without one, PACKAGE@VERSION is installed as published.
go_tool() {
  local name=$1 version=$2 package=$3 prepare=${4:-}
  local bin="$STATE/bin/$name-$version" build="$STATE/build/$name-$version" log="$STATE/log/$name-build.log"
  if [ -x "$bin" ]; then say "$name $version present"; return 0; fi
  have go || die "Go is not installed; $name is built from its Go module" "install Go (apt-get install golang)"
  say "building $name $version with go install"
  mkdir -p "$build" "$STATE/bin"
  if [ -n "$prepare" ]; then
    "$prepare" "$build"
    (cd "$build" && go mod tidy && GOBIN="$build/bin" go install "$package") >"$log" 2>&1
  else
    GOBIN="$build/bin" go install "$package@$version" >"$log" 2>&1
  fi || die "go install of $name failed (no network to the Go module proxy?)" "see $log"
  mv "$build/bin/$name" "$bin"
  say "$name at $bin"
}
