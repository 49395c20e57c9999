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

# tansu 0.6.0's memory engine (dynostore) answers a fetch from the middle
# of a record batch with the batches after it (records are skipped, or a
# consumer resuming inside the last batch gets nothing at all), and lists
# the latest offset one short of the high watermark when the newest batch
# held several records; its group coordinator could form a group with
# nothing assigned to anyone after a member died. So the broker is built
# from crates.io's sources with the small fixes in infra/tansu/ (see
# infra/tansu/README.md). The stamp beside the binary names the patches it
# was built with. Each patch and the crate it applies to:
PATCHES=(infra/tansu/dynostore-offsets.patch infra/tansu/group-sync.patch)
PATCHED_CRATES=(tansu-storage tansu-broker)
# Kept between builds: a changed patch recompiles two crates, not 400.
TARGET=.local/tansu-target
BIN_DIR="${CARGO_HOME:-$HOME/.cargo}/bin"
STAMP="$BIN_DIR/tansu.ledger-patch"

patch_id() { cat "${PATCHES[@]}" | sha256sum | cut -c1-16; }

installed() {
  command -v tansu >/dev/null 2>&1 && tansu --version 2>/dev/null | grep -q " $TANSU_VERSION\$" &&
    [[ -f $STAMP && "$(cat "$STAMP")" == "$(patch_id)" ]]
}

install() {
  export PATH="$BIN_DIR:$PATH"
  if installed; then
    return
  fi
  log "building tansu $TANSU_VERSION from crates.io with ${PATCHES[*]} (about 15 minutes on 2 cores)"
  local started=$SECONDS build=.local/tansu-build cache crate
  rm -rf "$build" && mkdir -p "$build/fetch/src"
  # The crates' sources, through cargo: a throwaway package that
  # depends on them is fetched, which also fills the cache for the build.
  # (Each with an empty [workspace]: they sit inside this checkout's.)
  printf '[package]\nname = "fetch-tansu"\nversion = "0.0.0"\nedition = "2021"\n\n[workspace]\n\n[dependencies]\ntansu = "=%s"\ntansu-storage = "=%s"\ntansu-broker = "=%s"\n' \
    "$TANSU_VERSION" "$TANSU_VERSION" "$TANSU_VERSION" >"$build/fetch/Cargo.toml"
  touch "$build/fetch/src/lib.rs"
  cargo fetch --manifest-path "$build/fetch/Cargo.toml" --quiet
  for crate in tansu "${PATCHED_CRATES[@]}"; do
    cache=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$crate-$TANSU_VERSION.crate" | head -1)
    tar xzf "$cache" -C "$build"
  done
  printf '\n[workspace]\n\n[patch.crates-io]\n' >>"$build/tansu-$TANSU_VERSION/Cargo.toml"
  local i
  for i in "${!PATCHES[@]}"; do
    crate=${PATCHED_CRATES[$i]}
    patch -d "$build/$crate-$TANSU_VERSION" -p1 --quiet <"${PATCHES[$i]}"
    printf '%s = { path = "../%s-%s" }\n' "$crate" "$crate" "$TANSU_VERSION" >>"$build/tansu-$TANSU_VERSION/Cargo.toml"
  done
  # The crate's own Cargo.lock pins every other dependency, as --locked
  # would; only the patched crate's source changes. The plain build has no
  # storage engine: dynostore gives memory://, libsql gives sqlite://.
  cargo build --release --quiet --manifest-path "$build/tansu-$TANSU_VERSION/Cargo.toml" \
    --target-dir "$TARGET" --features dynostore,libsql --bin tansu
  mkdir -p "$BIN_DIR"
  # (`command`: this function is called install too.)
  command install -m 0755 "$TARGET/release/tansu" "$BIN_DIR/tansu"
  patch_id >"$STAMP"
  log "tansu built and installed in $((SECONDS - started))s"
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
