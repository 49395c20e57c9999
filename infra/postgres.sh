#!/usr/bin/env bash
# PostgreSQL for the ledger's databases. Uses the server at
# LEDGER_PG_URL (default postgres://postgres@127.0.0.1:5432/postgres) when it
# answers; otherwise creates and starts a private cluster under
# .local/postgres (git-ignored) on port 5433, installing Debian's PostgreSQL
# with apt when it is missing. Idempotent.
#
#   infra/postgres.sh up|down|status|url
set -euo pipefail
cd "$(dirname "$0")/.."

DEFAULT_URL=${LEDGER_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
PRIVATE_PORT=${LEDGER_PG_PRIVATE_PORT:-5433}
PRIVATE_DIR=$PWD/.local/postgres
PRIVATE_URL="postgres://postgres@127.0.0.1:$PRIVATE_PORT/postgres"

log() { printf 'postgres: %s\n' "$*" >&2; }

answers() { # url
  local url=$1 hostport host port
  hostport=${url#*@}; hostport=${hostport%%/*}
  host=${hostport%%:*}; port=${hostport##*:}
  [[ $port == "$hostport" ]] && port=5432
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null || return 1
  if command -v psql >/dev/null 2>&1; then
    psql "$url" -Atqc 'SELECT 1' >/dev/null 2>&1
  fi
}

pg_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [[ -x $d/initdb && -x $d/pg_ctl ]] && { echo "$d"; return; }
  done
  return 1
}

as_owner() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

private_up() {
  local bin
  if ! bin=$(pg_bin); then
    log "installing Debian's postgresql with apt"
    infra/apt-install.sh postgresql
    bin=$(pg_bin)
  fi
  mkdir -p "$PRIVATE_DIR"
  # The server refuses to run as root: the cluster belongs to `postgres`.
  if [[ $(id -u) -eq 0 ]]; then chown postgres: "$PRIVATE_DIR"; fi
  if [[ ! -f $PRIVATE_DIR/data/PG_VERSION ]]; then
    log "creating a private cluster in $PRIVATE_DIR"
    as_owner "$bin/initdb" -D "$PRIVATE_DIR/data" -U postgres -A trust >/dev/null
  fi
  log "starting the private cluster on 127.0.0.1:$PRIVATE_PORT"
  as_owner "$bin/pg_ctl" -D "$PRIVATE_DIR/data" -l "$PRIVATE_DIR/server.log" -w -t 60 \
    -o "-p $PRIVATE_PORT -k $PRIVATE_DIR -c listen_addresses=127.0.0.1" start >/dev/null
}

url() {
  if answers "$DEFAULT_URL"; then echo "$DEFAULT_URL"; else echo "$PRIVATE_URL"; fi
}

up() {
  if answers "$DEFAULT_URL"; then
    log "using the server at $DEFAULT_URL"
    return
  fi
  if answers "$PRIVATE_URL"; then
    log "private cluster already running at $PRIVATE_URL"
    return
  fi
  private_up
  answers "$PRIVATE_URL" || { log "the private cluster does not answer; see $PRIVATE_DIR/server.log"; exit 1; }
  log "ready at $PRIVATE_URL"
}

down() {
  local bin
  if [[ -f $PRIVATE_DIR/data/postmaster.pid ]] && bin=$(pg_bin); then
    as_owner "$bin/pg_ctl" -D "$PRIVATE_DIR/data" -m fast stop >/dev/null && log "private cluster stopped"
  else
    log "no private cluster running (a shared server is left alone)"
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  url) url ;;
  status) if answers "$(url)"; then log "answering at $(url)"; else log "not answering"; exit 1; fi ;;
  *) echo "usage: $0 up|down|status|url" >&2; exit 2 ;;
esac
