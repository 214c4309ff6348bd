# Mailfleet. `make help` lists the targets. Every target bootstraps what it needs (scripts/bootstrap).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
RUN_DIR := .run

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

.PHONY: bootstrap
bootstrap: ## install Debian packages and the virtualenv (.venv)
	@scripts/bootstrap

.PHONY: run
run: bootstrap ## run examples/ locally (mailfleet local up): example.com on 127.0.0.1:20000-20005
	@scripts/run-demo

.PHONY: lint
lint: bootstrap ## ruff, mypy --strict, import-linter
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

.PHONY: fmt
fmt: bootstrap ## format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

.PHONY: test
test: prebuild lint ## lint, then every test tier under tests/ (unit, node, e2e, ..., the cluster last)
	$(BIN)/pytest -q

# Cold (a fresh machine), the cluster's Go programs and the image take minutes to build: started here, in
# the background and niced, they use what lint and the tiers before tests/cluster leave of the cores, and
# the tests that need them wait for them (each script has a lock). Warm, both return in under a second.
.PHONY: prebuild
prebuild: bootstrap ## start building the cluster's binaries and the image in the background (cached per machine)
	@scripts/build-cluster --background
	@mkdir -p $(RUN_DIR) && (setsid nice -n 19 scripts/build-image >$(RUN_DIR)/build-image.log 2>&1 </dev/null &)

.PHONY: unit
unit: bootstrap ## unit tests only
	$(BIN)/pytest -q tests/unit

.PHONY: crds
crds: bootstrap ## regenerate crds/ (and the chart's copy) from the API models
	$(BIN)/mailfleet crds --write crds
	cp crds/*.yaml charts/mailfleet/crds/

.PHONY: e2e-cluster
e2e-cluster: bootstrap ## the chart and the operator on a real control plane (kine, kube-apiserver, kube-controller-manager)
	scripts/build-cluster >/dev/null
	$(BIN)/pytest -q tests/cluster

.PHONY: image
image: bootstrap ## build the container image with buildah on a local Debian base (cached); prints the docker-archive path
	scripts/build-image

.PHONY: chart
chart: bootstrap ## helm lint --strict the chart (charts/mailfleet) and render it with each tests/chart/values file
	$(BIN)/helm lint --strict charts/mailfleet
	@for values in tests/chart/values/*.yaml; do \
	  echo "helm template charts/mailfleet -f $$values"; \
	  $(BIN)/helm template mailfleet charts/mailfleet -f "$$values" >/dev/null || exit 1; \
	done

.PHONY: bench
bench: ## benchmarks: the node against Postfix (SMTP in and out), Dovecot (IMAP, backups) and tar on this machine, mailbox moves (one, and a 3 -> 4 rebalance), then 10^6 fuzzed inputs (not a test)
	@scripts/bootstrap --bench
	$(PY) -m bench.smtp
	$(PY) -m bench.cluster
	$(PY) -m bench.imap
	$(PY) -m bench.outbound
	$(PY) -m bench.operator
	$(PY) -m bench.backup
	$(PY) -m bench.move
	$(PY) -m bench.fuzz

.PHONY: clean
clean: ## remove the virtualenv, caches and local run state
	rm -rf $(VENV) $(RUN_DIR) .mypy_cache .pytest_cache .ruff_cache
