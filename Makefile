# fhir-operator: `make help` lists the targets.
#
# One Cargo target directory outside the clone, shared by every checkout and
# by CI, so that a warm run rebuilds only what changed.
CACHE ?= $(or $(FHIR_OPERATOR_CACHE),$(HOME)/.cache/fhir-operator)
export FHIR_OPERATOR_CACHE := $(CACHE)
export CARGO_TARGET_DIR ?= $(CACHE)/target
CONTROL_PLANE := bash e2e/control-plane.sh
DEMO_NAMESPACE ?= fhir-demo

# nextest runs each test in its own process; every e2e test process starts
# its own control plane (about 5 s) unless USE_EXISTING_CLUSTER=true.
# `deps` (e2e/install.sh) installs it, with everything else the tests need.
TEST_RUNNER := cargo nextest run --no-fail-fast

.PHONY: help deps test unit e2e lint crds chart cluster cluster-down demo build bench bench-scale bench-gateway

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

build: ## build the operator
	cargo build -p fhir-operator

deps: ## install what the tests need, once (Debian packages, cargo-nextest, Kubernetes, Python tools, S3 server)
	@bash e2e/install.sh

test: deps ## every test: unit, offline schema, and e2e against a real kube-apiserver
	$(TEST_RUNNER) --workspace

unit: deps ## tests that need no API server
	$(TEST_RUNNER) -p fhir-operator
	$(TEST_RUNNER) -p fhir-operator-e2e --test offline_schema

e2e: deps ## tests against a real kube-apiserver (and the harness itself)
	$(TEST_RUNNER) -p fhir-operator-e2e

k8s-binaries:
	@$(CONTROL_PLANE) build

bench: k8s-binaries ## FhirEndpoint convergence vs a no-controller baseline (100 and 1,000 endpoints)
	cargo build --release -p fhir-operator -p fhir-operator-e2e --bins
	$(CARGO_TARGET_DIR)/release/bench --endpoints $(or $(BENCH_ENDPOINTS),100,1000)

# The operator's own work at scale (no pods): children against a raw client
# and against render | kubectl, memory, tier and key fan-out, edit latency
# under churn at 1,000 endpoints; children and memory at 10,000. kubectl:
# KUBECTL=..., else the one on PATH. Logs at info, as deployed.
BENCH_SCALE_SCENARIOS ?= children,render-kubectl,memory,tier-fanout,edit-latency,key-fanout
bench-scale: k8s-binaries ## the operator at 1,000 and 10,000 endpoints: children, memory, fan-out, edit latency, render | kubectl
	cargo build --release -p fhir-operator -p fhir-operator-e2e --bins
	FHIR_E2E_OPERATOR_LOG=$(or $(FHIR_E2E_OPERATOR_LOG),info) $(CARGO_TARGET_DIR)/release/bench \
		--scenario $(BENCH_SCALE_SCENARIOS) --endpoints $(or $(BENCH_SCALE_ENDPOINTS),1000)
	FHIR_E2E_OPERATOR_LOG=$(or $(FHIR_E2E_OPERATOR_LOG),info) $(CARGO_TARGET_DIR)/release/bench \
		--scenario children,memory --repeats 1 --endpoints $(or $(BENCH_SCALE_LARGE),10000)

bench-gateway: deps ## gateway latency and throughput: API keys vs token verification, cached and uncached
	cargo build --release -p fhir-operator -p fhir-operator-e2e --bins
	$(CARGO_TARGET_DIR)/release/gateway_bench

lint: deps ## rustfmt and clippy, warnings are errors
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

crds: ## regenerate crds/ and the chart's crds/ from the Rust types
	cargo run -q -p fhir-operator -- crds --out-dir crds --out-dir charts/fhir-operator/crds

chart: crds ## regenerate the chart's generated files: crds/ and the RBAC rules from operator/src/rbac.rs
	cargo run -q -p fhir-operator -- chart-rbac --out charts/fhir-operator/templates/_rules.tpl

cluster: ## start a local control plane with the CRDs installed
	@$(CONTROL_PLANE) up >/dev/null
	@$(CONTROL_PLANE) crds
	@echo
	@echo "Local control plane (Kubernetes v1.20.2) is up. Point kubectl at it:"
	@echo "  $$($(CONTROL_PLANE) env | head -n1)"
	@echo "kubectl 1.20 validates client-side against the server's older OpenAPI: use"
	@echo "  kubectl apply --server-side --validate=false -f examples/"
	@echo "Stop it with: make cluster-down"

cluster-down: ## stop the demo operator and the local control plane
	@pidfile=$(CACHE)/control-plane/operator.pid; \
	  if [ -f $$pidfile ]; then kill $$(cat $$pidfile) 2>/dev/null || true; rm -f $$pidfile; fi
	@$(CONTROL_PLANE) down

demo: deps ## a local cluster with a node, the operator running, every example applied, Ready and answering
	@bash e2e/demo.sh
