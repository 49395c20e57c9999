# The entry points of the delivery ledger. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
export PATH := $(or $(CARGO_HOME),$(HOME)/.cargo)/bin:$(PATH)

DEMO ?= 300
LEDGER := target/debug/ledger
# Loads the addresses of the local broker and PostgreSQL (infra/env.sh).
WITH_ENV := set -a; source <(infra/env.sh); set +a;

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: infra-up
infra-up: ## Start the local broker (tansu, installed if missing) and PostgreSQL
	infra/broker.sh up
	infra/postgres.sh up

.PHONY: infra-down
infra-down: ## Stop the local broker and any private PostgreSQL cluster
	infra/broker.sh down
	infra/postgres.sh down

.PHONY: infra-status
infra-status: ## Say whether the broker and PostgreSQL answer
	infra/broker.sh status; infra/postgres.sh status

.PHONY: build
build: ## Build the ledger binary
	cargo build -p ledger

.PHONY: setup
setup: infra-up build ## Infra up, databases migrated, topics created
	$(WITH_ENV) $(LEDGER) db migrate
	$(WITH_ENV) $(LEDGER) topics create
	@# A freshly started memory broker holds an empty log; the databases'
	@# state of the previous log would make the projector skip the new one.
	@if [[ -f .local/broker/fresh-log ]]; then \
	  $(WITH_ENV) $(LEDGER) db reset --yes && rm -f .local/broker/fresh-log; \
	fi

.PHONY: run
run: setup ## Run every role on local defaults, submit a demo, serve until Ctrl-C
	$(WITH_ENV) $(LEDGER) run all --demo $(DEMO)

.PHONY: test
test-tools: ## What the tests run besides the ledger: an SMTP server and a manifest validator (PyPI, .local/venv), promtool (Debian)
	@if .local/venv/bin/python -c 'import aiosmtpd, kubernetes_validate' 2>/dev/null; then echo "test-tools: aiosmtpd, kubernetes-validate present"; else \
	  python3 -m venv .local/venv && .local/venv/bin/pip install --quiet 'aiosmtpd==1.4.6' 'kubernetes-validate==1.37.0'; fi
	@echo "test-tools: promtool at $$(infra/promtool.sh)"

.PHONY: test-tools
test: infra-up compose-check test-tools ## Run the whole test suite against the local broker and PostgreSQL
	infra/drop-test-databases.sh
	cargo build -p ledger  # tests run it as a process of its own
	rm -rf target/reliability
	@rc=0; if cargo nextest --version >/dev/null 2>&1; then \
	  $(WITH_ENV) cargo nextest run --workspace --no-fail-fast || rc=$$?; \
	else \
	  $(WITH_ENV) cargo test --workspace --no-fail-fast || rc=$$?; \
	fi; \
	if [[ -f target/reliability/report.md ]]; then echo; echo "reliability report (target/reliability/report.md):"; cat target/reliability/report.md; fi; \
	exit $$rc

.PHONY: test-reliability
test-reliability: infra-up test-tools ## The reliability scenarios (kills, outages, isolation; also in make test); prints their report
	infra/drop-test-databases.sh
	cargo build -p ledger
	rm -rf target/reliability
	@rc=0; $(WITH_ENV) cargo nextest run -p ledger-tests --test reliability --no-fail-fast --run-ignored all -E 'not test(broker_killed)' || rc=$$?; \
	echo; cat target/reliability/report.md 2>/dev/null; exit $$rc

.PHONY: lint
lint: ## rustfmt and clippy, warnings as errors
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

.PHONY: schemas
schemas: ## Rewrite schemas/events/*.json from the Rust types (after a deliberate change)
	UPDATE_SCHEMAS=1 cargo test -p ledger-schemas --test schema_files -- --test-threads=1

.PHONY: compose-check
compose-check: ## Validate infra/compose.yaml (docker compose config; docker-compose from apt if needed)
	@if docker compose version >/dev/null 2>&1; then \
	  docker compose -f infra/compose.yaml config --quiet; \
	else \
	  command -v docker-compose >/dev/null 2>&1 || infra/apt-install.sh docker-compose; \
	  docker-compose -f infra/compose.yaml config --quiet; \
	fi
	@echo "infra/compose.yaml is valid"

.PHONY: summary
summary: ## Print messages by status from the reporting read model
	$(WITH_ENV) $(LEDGER) summary

.PHONY: bench-ingest
bench-ingest: infra-up ## Ingest throughput and latency per form, as ratios to raw produce (release build)
	$(WITH_ENV) cargo run --release -p ledger-tests --bin bench-ingest

.PHONY: bench-render
bench-render: infra-up ## Renderer throughput on a 300,000-recipient campaign, as a ratio to raw consume+produce
	$(WITH_ENV) cargo run --release -p ledger-tests --bin bench-render

.PHONY: bench-deliver
bench-deliver: infra-up ## Dispatcher throughput (sink) as a ratio to raw consume; a 6,000/min governor over 60 s with two instances
	$(WITH_ENV) cargo run --release -p ledger-tests --bin bench-deliver

.PHONY: bench
bench: infra-up ## Every benchmark in one run: raw baselines, each stage alone, the 300,000-recipient campaign end to end; bench-out/summary.md
	@# A fresh broker: tansu's memory engine slows down with many topics.
	infra/broker.sh down && infra/broker.sh up
	cargo build --release -p ledger -p ledger-tests --bins
	$(WITH_ENV) target/release/bench-ingest
	$(WITH_ENV) target/release/bench-render
	$(WITH_ENV) target/release/bench-deliver
	$(WITH_ENV) target/release/bench-project
	$(WITH_ENV) target/release/bench-replay
	$(WITH_ENV) target/release/bench-pipeline

.PHONY: bench-pipeline
bench-pipeline: infra-up ## The 300,000-recipient campaign end to end, each role its own process (release build)
	cargo build --release -p ledger -p ledger-tests --bin ledger --bin bench-pipeline
	$(WITH_ENV) target/release/bench-pipeline

.PHONY: test-broker-restart
test-broker-restart: infra-up ## The broker killed and restarted mid-campaign on tansu's sqlite engine (not in make test: that engine panics under load)
	cargo build -p ledger
	@rc=0; $(WITH_ENV) cargo nextest run -p ledger-tests --test reliability --run-ignored only -E 'test(broker_killed)' || rc=$$?; \
	echo; cat target/reliability/report.md 2>/dev/null; exit $$rc

.PHONY: soak
soak: infra-up ## Not in CI: every role for SOAK_SECS (600) at 70 % of the last measured end-to-end rate; lag and memory must stay flat
	cargo build --release -p ledger -p ledger-tests --bin ledger --bin soak
	$(WITH_ENV) target/release/soak

.PHONY: bench-replay
bench-replay: infra-up ## `ledger replay projections` events/s as a ratio to raw consume of the same log (release build)
	cargo build --release -p ledger
	$(WITH_ENV) cargo run --release -p ledger-tests --bin bench-replay

.PHONY: bench-project
bench-project: infra-up ## Projection rows/s as a ratio to raw binary COPY into the same table
	$(WITH_ENV) cargo run --release -p ledger-tests --bin bench-project
