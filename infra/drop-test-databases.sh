#!/usr/bin/env bash
# Drops databases left behind by e2e tests that failed before cleaning up
# (names t<12 hex>_ops / t<12 hex>_reporting). Never touches anything else.
set -euo pipefail
cd "$(dirname "$0")/.."
url=$(infra/postgres.sh url)
command -v psql >/dev/null 2>&1 || exit 0
psql "$url" -Atqc "SELECT datname FROM pg_database WHERE datname ~ '^t[0-9a-f]{12}_(ops|reporting)$'" |
  while read -r db; do
    psql "$url" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
  done
