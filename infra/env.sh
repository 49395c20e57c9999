#!/usr/bin/env bash
# Prints the environment the ledger and its tests use with the local infra
# (`set -a; source <(infra/env.sh); set +a`). Values already set win.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${LEDGER_BROKER_PORT:-9092}
pg=$(infra/postgres.sh url)
root=${pg%/*}
echo "LEDGER_TEST_BROKERS=${LEDGER_TEST_BROKERS:-127.0.0.1:$port}"
echo "LEDGER_TEST_DATABASE_URL=${LEDGER_TEST_DATABASE_URL:-$pg}"
echo "LEDGER_KAFKA__BROKERS=${LEDGER_KAFKA__BROKERS:-127.0.0.1:$port}"
echo "LEDGER_OPS_DATABASE_URL=${LEDGER_OPS_DATABASE_URL:-$root/ledger}"
echo "LEDGER_REPORTING_DATABASE_URL=${LEDGER_REPORTING_DATABASE_URL:-$root/ledger_reporting}"
