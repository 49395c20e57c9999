#!/usr/bin/env bash
# promtool (Prometheus's rule checker), from Debian's prometheus package:
# unpacked into .local/prometheus, not installed (no daemon, no service).
# Prints the path of a promtool to use; the one on PATH if there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v promtool >/dev/null 2>&1; then
  command -v promtool
  exit 0
fi
DIR=$PWD/.local/prometheus
if [[ ! -x $DIR/usr/bin/promtool ]]; then
  mkdir -p "$DIR/deb"
  cd "$DIR/deb"
  if ! apt-get download prometheus >/dev/null 2>&1; then
    # A machine whose package index is empty or stale.
    if [[ $(id -u) -eq 0 ]]; then apt-get update -qq; else sudo apt-get update -qq; fi
    apt-get download prometheus >/dev/null
  fi
  dpkg -x "$(ls prometheus_*.deb | head -1)" "$DIR"
fi
echo "$DIR/usr/bin/promtool"
