#!/usr/bin/env bash
# `make demo`: a local control plane, the CRDs, the operator running in the
# background as the `fhir-operator` user with exactly its RBAC, and every
# example applied and reconciled. `make cluster-down` stops all of it.
set -euo pipefail
cd "$(dirname "$0")/.."
CP="bash e2e/control-plane.sh"
NS=${DEMO_NAMESPACE:-fhir-demo}
CACHE_ROOT=${FHIR_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fhir-operator}
STATE=${FHIR_CONTROL_PLANE_DIR:-$CACHE_ROOT/control-plane}
METRICS=${DEMO_METRICS_ADDR:-127.0.0.1:18080}
say() { echo "demo: $*" >&2; }

if ! command -v kubectl >/dev/null; then
  say "installing kubectl (Debian package kubernetes-client)"
  apt-get install -y -q kubernetes-client >/dev/null
fi
$CP up >/dev/null
$CP crds
operator_kubeconfig=$($CP rbac)
eval "$($CP env)"

cargo build -q -p fhir-operator
bin=${CARGO_TARGET_DIR:-target}/debug/fhir-operator
if [ -f "$STATE/operator.pid" ] && kill -0 "$(cat "$STATE/operator.pid")" 2>/dev/null; then
  kill "$(cat "$STATE/operator.pid")"
fi
KUBECONFIG=$operator_kubeconfig setsid "$bin" run --metrics-addr "$METRICS" >"$STATE/operator.log" 2>&1 </dev/null &
echo $! >"$STATE/operator.pid"
for _ in $(seq 1 300); do
  curl -fs "http://$METRICS/readyz" >/dev/null 2>&1 && break
  kill -0 "$(cat "$STATE/operator.pid")" 2>/dev/null || { tail -n 20 "$STATE/operator.log" >&2; say "the operator exited"; exit 1; }
  sleep 0.2
done
say "operator running (pid $(cat "$STATE/operator.pid"), log $STATE/operator.log, metrics http://$METRICS/metrics)"

kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply --validate=false -f - >/dev/null
# What the full example refers to: its TLS Secret, the database credentials
# and the CA that verifies the database server.
tmp=$(mktemp -d)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 90 -subj "/CN=patients.$NS.svc" \
  -addext "subjectAltName=DNS:patients,DNS:patients.$NS,DNS:patients.$NS.svc" -keyout "$tmp/tls.key" -out "$tmp/tls.crt" 2>/dev/null
kubectl -n "$NS" create secret tls patients-tls --cert "$tmp/tls.crt" --key "$tmp/tls.key" --dry-run=client -o yaml \
  | kubectl apply --validate=false -f - >/dev/null
kubectl -n "$NS" create secret generic patients-db-credentials --from-literal=username=fhir \
  --from-literal=password="$(openssl rand -hex 24)" --dry-run=client -o yaml | kubectl apply --validate=false -f - >/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 -subj "/CN=demo database CA" \
  -keyout "$tmp/ca.key" -out "$tmp/ca.crt" 2>/dev/null
kubectl -n "$NS" create secret generic patients-db-ca --from-file=ca.crt="$tmp/ca.crt" --dry-run=client -o yaml \
  | kubectl apply --validate=false -f - >/dev/null
rm -rf "$tmp"
kubectl apply --server-side --validate=false -n "$NS" -f examples/

for _ in $(seq 1 150); do
  n=$(kubectl get fhirendpoints -n "$NS" -o jsonpath='{range .items[*]}{.status.complianceSummary}{"\n"}{end}' | grep -c / || true)
  [ "$n" -ge 2 ] && break
  sleep 0.2
done
echo
kubectl get fhirendpoints -n "$NS"
echo
kubectl get keyrotationschedules -n "$NS"
echo
kubectl get backuppolicies -n "$NS"
echo
kubectl get deployments,services,networkpolicies,configmaps,secrets -n "$NS" -l app.kubernetes.io/managed-by=fhir-operator
echo
say "no kubelet runs here, so pods stay Pending and Ready stays False (RollingOut);"
say "  kubectl -n $NS get fhirendpoint patients -o yaml   shows conditions and compliance evidence"
say "  kubectl -n $NS annotate bkp patients-nightly fhiroperator.io/backup-now=\$(date +%s)   creates a backup Job now"
say "  make cluster-down                                  stops the operator and the control plane"
