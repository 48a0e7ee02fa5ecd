#!/usr/bin/env bash
# `make demo`: a local control plane with a real node (kubelet + Docker
# engine, see the README), the CRDs, the operator running in the background
# as the `fhir-operator` user with exactly its RBAC and its image flags
# pointing at the images built here, and every example applied: the
# endpoints become Ready and answer through the gateway, and the nightly
# BackupPolicy backs up the demo database for real. `make cluster-down`
# stops all of it.
#
# HAPI FHIR's image cannot be fetched here, so the example endpoints run the
# Helios FHIR Server (`server.flavor: helios`, the locally built image) with
# small resource requests and a public URL without a path (hfs serves FHIR
# at the root); the full example's database is a PostgreSQL 15
# pod in the demo namespace, reached by its ClusterIP (the local node has no
# cluster DNS) without TLS (hfs 0.2.7 cannot use TLS to PostgreSQL, so that
# endpoint's `tls` compliance entry fails, as it should).
set -euo pipefail
cd "$(dirname "$0")/.."
CP="bash e2e/control-plane.sh"
NS=${DEMO_NAMESPACE:-fhir-demo}
CACHE_ROOT=${FHIR_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fhir-operator}
STATE=${FHIR_CONTROL_PLANE_DIR:-$CACHE_ROOT/control-plane}
METRICS=${DEMO_METRICS_ADDR:-127.0.0.1:18080}
say() { echo "demo: $*" >&2; }
k() { kubectl -n "$NS" "$@"; }
apply_stdin() { kubectl apply --server-side --validate=false -n "$NS" -f - >/dev/null; }

if ! command -v kubectl >/dev/null; then
  say "installing kubectl (Debian package kubernetes-client)"
  apt-get install -y -q kubernetes-client >/dev/null
fi
# The operator first: the node's images include this build's binary.
cargo build -q -p fhir-operator --bin fhir-operator --bin control-plane 2>/dev/null || cargo build -q -p fhir-operator
cargo build -q -p fhir-operator-e2e --bin control-plane
bin=${CARGO_TARGET_DIR:-target}/debug/fhir-operator
if $CP status >/dev/null 2>&1; then
  say "a local control plane runs already: stopping it, the demo starts afresh"
  [ -f "$STATE/operator.pid" ] && kill "$(cat "$STATE/operator.pid")" 2>/dev/null || true
  $CP down >/dev/null
fi
$CP up --node >/dev/null
$CP crds
operator_kubeconfig=$($CP rbac)
eval "$($CP env)"
refs=$(bash e2e/images.sh refs --operator "$bin")
ref() { sed -n "s/^$1=//p" <<<"$refs"; }

if [ -f "$STATE/operator.pid" ] && kill -0 "$(cat "$STATE/operator.pid")" 2>/dev/null; then
  kill "$(cat "$STATE/operator.pid")"
fi
KUBECONFIG=$operator_kubeconfig setsid "$bin" run --metrics-addr "$METRICS" \
  --gateway-image "$(ref nginx)" --sidecar-image "$(ref operator)" --postgres-image "$(ref postgres)" \
  >"$STATE/operator.log" 2>&1 </dev/null &
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
cp "$tmp/tls.crt" "$STATE/demo-patients-tls.crt"
rm -rf "$tmp"

# The full example's database: PostgreSQL 15 in a pod.
sed "s|IMAGE|$(ref postgres)|" e2e/manifests/postgres.yaml | apply_stdin
db_ip=$(k get service patients-db -o jsonpath='{.spec.clusterIP}')

# The nightly policy's claim: a PersistentVolume on a host directory.
# A fresh directory each time: the demo's backups are demo data.
backups=$STATE/demo-backups
rm -rf "$backups"
mkdir -p "$backups"
chown 999:999 "$backups"
sed -e "s|NAMESPACE|$NS|g" -e "s|HOST_DIR|$backups|" e2e/manifests/backup-volume.yaml \
  | kubectl apply --server-side --validate=false -f - >/dev/null

# Every example; the endpoints on the Helios FHIR Server (see the top).
for f in examples/*.yaml; do
  case $f in
    */fhirendpoint-*)
      kubectl create --dry-run=client -o json -n "$NS" -f "$f" \
        | python3 -c '
import json, sys
image, db_ip, namespace = sys.argv[1:]
endpoint = json.load(sys.stdin)
# hfs serves FHIR at the root, not under /fhir: the public URL has no path.
endpoint["spec"]["publicUrl"] = "https://%s.%s.svc" % (endpoint["metadata"]["name"], namespace)
server = endpoint.setdefault("spec", {}).setdefault("server", {})
server.update(flavor="helios", image=image,
              resources={"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}})
server.pop("env", None)  # HAPI settings
database = endpoint["spec"].get("database")
if database:
    database.update(host=db_ip, sslMode="disable")
    database.pop("caSecret", None)
print(json.dumps(endpoint))
' "$(ref hfs)" "$db_ip" "$NS" | apply_stdin ;;
    *) apply_stdin <"$f" ;;
  esac
done

say "waiting for every endpoint to be Ready (the first pods start in about 15 s)"
for _ in $(seq 1 240); do
  total=$(k get fhirendpoints -o name | wc -l)
  ready=$(k get fhirendpoints \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True || true)
  [ "$total" -gt 0 ] && [ "$ready" = "$total" ] && break
  sleep 1
done
echo
k get fhirendpoints
echo
k get keyrotationschedules
echo
k get deployments,pods,services
[ "$ready" = "$total" ] || { say "not every endpoint became Ready; kubectl -n $NS describe pods says why"; exit 1; }

# Through the Service over TLS 1.3, with a key from the schedule's Secret.
ip=$(k get service patients -o jsonpath='{.spec.clusterIP}')
host=patients.$NS.svc
secret=$(k get keyrotationschedule patients-clients -o jsonpath='{.spec.secretName}')
secret=${secret:-patients-clients-keys}
curl_cmd="curl --silent --tlsv1.3 --cacert $STATE/demo-patients-tls.crt --resolve $host:443:$ip"
key_cmd="kubectl -n $NS get secret $secret -o jsonpath='{.data.current\\.client\\.clinical-portal}' | base64 -d"
echo
say "a call with the clinical-portal key (read from the Secret, never printed):"
echo "  $curl_cmd -H \"X-API-Key: \$($key_cmd)\" https://$host/metadata"
answer=$(mktemp)
$curl_cmd -o "$answer" -H "X-API-Key: $(eval "$key_cmd")" "https://$host/metadata" || true
python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
assert d["resourceType"] == "CapabilityStatement", d
print("  ->", d["resourceType"], "of", d.get("software", {}).get("name", ""), "FHIR", d.get("fhirVersion", ""))
' "$answer" || { say "no CapabilityStatement: $(head -c 300 "$answer")"; rm -f "$answer"; exit 1; }
rm -f "$answer"
say "the same without a key:"
echo "  $curl_cmd -o /dev/null -w '%{http_code}' https://$host/metadata"
echo "  -> $($curl_cmd -o /dev/null -w '%{http_code}' "https://$host/metadata")"

# The nightly BackupPolicy, now.
k annotate backuppolicy patients-nightly fhiroperator.io/backup-now="$(date +%s)" --overwrite >/dev/null
echo
say "backing up the demo database now (BackupPolicy patients-nightly, annotation fhiroperator.io/backup-now)"
done_at=
for _ in $(seq 1 180); do
  done_at=$(k get backuppolicy patients-nightly -o jsonpath='{.status.lastSuccessfulBackup.completionTime}')
  [ -n "$done_at" ] && break
  sleep 1
done
k get backuppolicies
echo
[ -n "$done_at" ] || { say "no backup within 3 minutes; kubectl -n $NS get jobs,pods says why"; exit 1; }
say "last successful backup: $(k get backuppolicy patients-nightly -o jsonpath='{.status.lastSuccessfulBackup}')"
say "on the backup volume ($backups):"
find "$backups" -type f -printf '  %P  %s bytes\n' >&2
echo
say "  kubectl -n $NS get fhirendpoint patients -o yaml   shows conditions and compliance evidence"
say "  make cluster-down                                  stops the operator, the node and the control plane"
