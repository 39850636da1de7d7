#!/usr/bin/env bash
# PostgreSQL from Debian's packages: the cluster $POSTGRES_VERSION/main on 127.0.0.1, with a
# `tally` role and database. Usage: postgres.sh start|stop|status
SERVICE=postgres
. "$(dirname "$0")/common.sh"

as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
psql_admin() { as_postgres psql -p "$POSTGRES_PORT" -v ON_ERROR_STOP=1 -qtA "$@"; }

install() {
  if [ ! -x "/usr/lib/postgresql/$POSTGRES_VERSION/bin/postgres" ]; then
    apt_install "postgresql-$POSTGRES_VERSION" "postgresql-client-$POSTGRES_VERSION"
  fi
  if ! pg_lsclusters -h | awk '{print $1"/"$2}' | grep -qx "$POSTGRES_VERSION/main"; then
    say "creating cluster $POSTGRES_VERSION/main on port $POSTGRES_PORT"
    pg_createcluster "$POSTGRES_VERSION" main -p "$POSTGRES_PORT" >/dev/null
  fi
}

start() {
  [ "$(id -u)" = 0 ] || have sudo || die "managing the Debian cluster needs root or sudo" "run as root, or point TALLY_DATABASE_URL at a PostgreSQL you run"
  install
  local status; status=$(pg_lsclusters -h | awk -v v="$POSTGRES_VERSION" '$1==v && $2=="main" {print $3" "$4}')
  local port=${status%% *} state=${status##* }
  [ "$port" = "$POSTGRES_PORT" ] || die "cluster $POSTGRES_VERSION/main is set to port $port, not $POSTGRES_PORT" \
    "change port in /etc/postgresql/$POSTGRES_VERSION/main/postgresql.conf or POSTGRES_PORT in versions.env"
  if [ "$state" = online ]; then
    say "already running on 127.0.0.1:$POSTGRES_PORT"
  else
    ensure_port_free "$POSTGRES_PORT" "PostgreSQL"
    say "starting cluster $POSTGRES_VERSION/main"
    pg_ctlcluster "$POSTGRES_VERSION" main start \
      || die "PostgreSQL did not start" "see /var/log/postgresql/postgresql-$POSTGRES_VERSION-main.log"
  fi
  wait_port "$POSTGRES_PORT" 30 "/var/log/postgresql/postgresql-$POSTGRES_VERSION-main.log"
  if [ "$(psql_admin -c "select 1 from pg_roles where rolname='$POSTGRES_USER'")" != 1 ]; then
    say "creating role $POSTGRES_USER"
    psql_admin -c "create role $POSTGRES_USER login createdb password '$POSTGRES_PASSWORD'"
  fi
  # Dropping a database WITH (FORCE) ends its sessions, an autovacuum worker's included, which PostgreSQL 15
  # allows only to members of pg_signal_backend (the test suite drops its databases so).
  psql_admin -c "set client_min_messages = warning" -c "grant pg_signal_backend to $POSTGRES_USER" >/dev/null
  if [ "$(psql_admin -c "select 1 from pg_database where datname='$POSTGRES_DB'")" != 1 ]; then
    say "creating database $POSTGRES_DB"
    psql_admin -c "create database $POSTGRES_DB owner $POSTGRES_USER"
  fi
  say "ready: postgresql://$POSTGRES_USER:***@127.0.0.1:$POSTGRES_PORT/$POSTGRES_DB"
}

case "${1:-start}" in
  start) start ;;
  stop) say "stopping cluster $POSTGRES_VERSION/main"; pg_ctlcluster "$POSTGRES_VERSION" main stop 2>/dev/null || say "was not running" ;;
  status) pg_lsclusters ;;
  *) die "unknown command $1" "use start, stop or status" ;;
esac
