#!/usr/bin/env bash
# The local Kafka-API broker for development and tests: tansu, installed from
# crates.io when missing. Idempotent: `up` on a running broker does nothing.
#
#   infra/broker.sh up|down|status|install
#
#   LEDGER_BROKER_PORT     port on 127.0.0.1 (default 9092)
#   LEDGER_BROKER_STORAGE  memory (default) or sqlite (durable, survives a
#                          restart: .local/broker/ledger.db)
set -euo pipefail
cd "$(dirname "$0")/.."

TANSU_VERSION=0.6.0
PORT=${LEDGER_BROKER_PORT:-9092}
STORAGE=${LEDGER_BROKER_STORAGE:-memory}
STATE=.local/broker
PIDFILE=$STATE/tansu.pid

log() { printf 'broker: %s\n' "$*" >&2; }

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

installed() { command -v tansu >/dev/null 2>&1 && tansu --version 2>/dev/null | grep -q " $TANSU_VERSION\$"; }

install() {
  export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
  if installed; then
    return
  fi
  log "installing tansu $TANSU_VERSION from crates.io (about 10 minutes on 2 cores)"
  local started=$SECONDS
  # The plain install has no storage engine: dynostore gives memory://,
  # libsql gives sqlite://.
  cargo install "tansu@$TANSU_VERSION" --locked --features dynostore,libsql
  log "tansu installed in $((SECONDS - started))s"
}

up() {
  if answers; then
    log "already answering on 127.0.0.1:$PORT"
    return
  fi
  install
  export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
  mkdir -p "$STATE"
  local engine
  case "$STORAGE" in
    memory) engine="memory://tansu/" ;;
    # A path relative to the broker's working directory ($STATE).
    sqlite) engine="sqlite://ledger.db" ;;
    *) log "LEDGER_BROKER_STORAGE must be memory or sqlite, not '$STORAGE'"; exit 2 ;;
  esac
  log "starting tansu on 127.0.0.1:$PORT with $engine"
  (
    cd "$STATE"
    nohup tansu broker \
      --listener-url "tcp://127.0.0.1:$PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$PORT" \
      --storage-engine "$engine" >tansu.log 2>&1 &
    echo $! >tansu.pid
    # A new memory broker is an empty log: whatever the databases remember
    # of an earlier log is stale (see `make setup`).
    if [[ $STORAGE == memory ]]; then touch fresh-log; else rm -f fresh-log; fi
  )
  # Wait for the port, not a fixed sleep; `ledger topics create` then waits
  # for a Kafka metadata answer before it creates anything.
  for _ in $(seq 1 300); do
    if answers; then
      log "ready on 127.0.0.1:$PORT"
      return
    fi
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      log "tansu exited; its log:"
      tail -20 "$STATE/tansu.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  log "tansu did not answer within 30s; see $STATE/tansu.log"
  exit 1
}

down() {
  if [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    kill "$(cat "$PIDFILE")"
    for _ in $(seq 1 50); do
      kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break
      sleep 0.1
    done
    log "stopped"
  else
    log "not running (from this checkout)"
  fi
  rm -f "$PIDFILE"
}

status() {
  if answers; then log "answering on 127.0.0.1:$PORT"; else log "not answering on 127.0.0.1:$PORT"; exit 1; fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  install) install ;;
  *) echo "usage: $0 up|down|status|install" >&2; exit 2 ;;
esac
