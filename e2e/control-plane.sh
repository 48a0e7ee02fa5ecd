#!/usr/bin/env bash
# Local Kubernetes control plane for fhir-operator tests and demos:
# etcd + kube-apiserver + kube-controller-manager v1.20.2 on loopback.
#
#   e2e/control-plane.sh build   build (once) and cache the Kubernetes binaries
#   e2e/control-plane.sh build-node  build (once) and cache kubelet, kube-proxy
#                                and kube-scheduler for a local node (see below)
#   e2e/control-plane.sh up      start a control plane in the background; prints
#                                `export KUBECONFIG=...`
#   e2e/control-plane.sh crds    install the operator's CRDs into it
#   e2e/control-plane.sh rbac    bind the operator's RBAC to the `fhir-operator`
#                                user; prints that user's kubeconfig
#   e2e/control-plane.sh env     print the exports that point tools and tests at it
#   e2e/control-plane.sh status  list its processes and whether each runs
#   e2e/control-plane.sh down    stop every process `up` started, by pid, and
#                                undo what a node changed (also the leftovers
#                                of killed test processes)
#   e2e/control-plane.sh up --node   (or run --node) with a local node:
#                                kubelet + kube-proxy + kube-scheduler on the
#                                Docker engine (e2e/images.sh builds its images)
#   e2e/control-plane.sh run     start one in the foreground; Ctrl-C stops it
#
# Binaries, in order: KUBEBUILDER_ASSETS (a directory holding kube-apiserver
# and etcd, the envtest convention); otherwise Kubernetes v1.20.2 built from
# Debian's `kubernetes` source package (about 8 minutes, once; needs root for
# apt-get) and cached under
# ${FHIR_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fhir-operator}.
# State (pids, kubeconfig, logs) lives in $FHIR_CONTROL_PLANE_DIR, default
# <cache>/control-plane. The processes are started and stopped by the Rust
# harness (e2e/src/control_plane.rs), which the tests use directly.
set -euo pipefail

K8S_VERSION=v1.20.2
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
CACHE_ROOT=${FHIR_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fhir-operator}
BIN_DIR=$CACHE_ROOT/k8s-$K8S_VERSION/bin
STATE_DIR=${FHIR_CONTROL_PLANE_DIR:-$CACHE_ROOT/control-plane}

die() { echo "control-plane: error: $*" >&2; exit 1; }
say() { echo "control-plane: $*" >&2; }

need() { # need CMD PACKAGE
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found; install Debian package '$2' (apt-get install -y $2)"
}

apt_install() {
  if [ "$(id -u)" != 0 ]; then die "need root to apt-get install $*"; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
}

# Adds deb-src entries mirroring the machine's own deb entries (no host is
# hard-coded: the URIs are read from the existing sources).
enable_deb_src() {
  local src=/etc/apt/sources.list.d/debian.sources
  local out=/etc/apt/sources.list.d/fhir-operator-src.sources
  [ -f "$out" ] && return 0
  [ -f "$src" ] || die "no $src to derive deb-src entries from"
  sed -n 's/^Types: deb$/Types: deb-src/; p' "$src" > "$out"
  apt-get update -q >/dev/null
}

# source_tree WORK: Debian's Kubernetes source package unpacked in WORK
# (its one kubernetes-* directory), with the tools to build it installed.
source_tree() {
  local work=$1
  if ! command -v go >/dev/null || ! command -v rsync >/dev/null \
     || [ ! -d /usr/share/gocode/src/github.com/modern-go/reflect2 ]; then
    [ "$(id -u)" = 0 ] || die "missing build tools; as root: apt-get install -y golang-go rsync jq golang-github-modern-go-reflect2-dev"
    apt-get update -q >/dev/null
    apt_install golang-go rsync jq golang-github-modern-go-reflect2-dev
  fi
  enable_deb_src
  (cd "$work" && apt-get source -q "kubernetes=$DEB_VERSION" >/dev/null 2>"$work/source.log") \
    || { cat "$work/source.log" >&2; die "apt-get source kubernetes=$DEB_VERSION failed"; }
  local trees; trees=$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' | wc -l)
  [ "$trees" = 1 ] || die "source package unpacked $trees kubernetes-* directories, not one"
  local tree; tree=$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*')
  # The vendored reflect2 1.0.1 faults under Go >= 1.18 (mapiterinit) as soon
  # as a custom resource is written; Debian's 1.0.2 works.
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
}

cmd_build() {
  if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
    [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ] || die "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS has no kube-apiserver"
    say "using binaries from KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"; return 0
  fi
  if ! command -v etcd >/dev/null; then
    [ "$(id -u)" = 0 ] || die "etcd not found; as root: apt-get install -y etcd-server"
    apt-get update -q >/dev/null
    apt_install etcd-server
  fi
  if [ -x "$BIN_DIR/kube-apiserver" ] && [ -x "$BIN_DIR/kube-controller-manager" ]; then
    say "cached Kubernetes $K8S_VERSION binaries in $BIN_DIR"; return 0
  fi
  say "building Kubernetes $K8S_VERSION from Debian's source package (about 8 minutes on 2 cores, once)"
  local work; work=$(mktemp -d "${TMPDIR:-/tmp}/fhir-k8s-build.XXXXXX")
  source_tree "$work"
  (
    cd "$work"/kubernetes-*
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$work/make.log" 2>&1 \
      || { tail -n 40 "$work/make.log" >&2; die "Kubernetes build failed; full log in $work/make.log"; }
    mkdir -p "$BIN_DIR.tmp"
    cp _output/local/bin/linux/amd64/kube-apiserver _output/local/bin/linux/amd64/kube-controller-manager "$BIN_DIR.tmp/"
  )
  rm -rf "$BIN_DIR"; mv "$BIN_DIR.tmp" "$BIN_DIR"
  rm -rf "$work"
  say "built and cached in $BIN_DIR"
}

# The node's binaries: kubelet (with its built-in dockershim), kube-proxy and
# kube-scheduler, from the same source tree, with one patch: this kind of VM
# lacks CAP_SYS_RESOURCE, so no process may set a negative oom_score_adj, and
# dockershim's -998 for the pause container and the QoS policy's -997 for
# Guaranteed pods make every sandbox fail (`runc create failed: ... can't get
# final child's PID from pipe: EOF`). Both become 0. The cache is keyed by
# version and patch: change NODE_PATCH_KEY whenever the patch changes.
NODE_PATCH_KEY=oom-score-adj-0.v1
NODE_BIN_DIR=$CACHE_ROOT/k8s-$K8S_VERSION/node-bin
NODE_KEY="$K8S_VERSION $DEB_VERSION $NODE_PATCH_KEY"

# patch_line FILE OLD NEW: replace the one line matching OLD (a fixed string)
# by NEW; fail loudly when OLD does not match exactly once.
patch_line() {
  local file=$1 old=$2 new=$3 n
  n=$(grep -cF -- "$old" "$file" || true)
  [ "$n" = 1 ] || die "patch: expected exactly one line '$old' in $file, found $n"
  sed -i "s|$old|$new|" "$file"
  grep -qF -- "$new" "$file" || die "patch: '$new' not in $file after sed"
}

cmd_build_node() {
  if [ -f "$NODE_BIN_DIR/KEY" ] && [ "$(cat "$NODE_BIN_DIR/KEY")" = "$NODE_KEY" ] \
     && [ -x "$NODE_BIN_DIR/kubelet" ] && [ -x "$NODE_BIN_DIR/kube-proxy" ] && [ -x "$NODE_BIN_DIR/kube-scheduler" ]; then
    say "cached node binaries ($NODE_KEY) in $NODE_BIN_DIR"; return 0
  fi
  say "building kubelet, kube-proxy, kube-scheduler $K8S_VERSION (about 20 minutes on 2 cores, once)"
  local work; work=$(mktemp -d "${TMPDIR:-/tmp}/fhir-k8s-node-build.XXXXXX")
  source_tree "$work"
  (
    cd "$work"/kubernetes-*
    patch_line pkg/kubelet/dockershim/docker_sandbox.go \
      'defaultSandboxOOMAdj int = -998' 'defaultSandboxOOMAdj int = 0'
    patch_line pkg/kubelet/qos/policy.go \
      'guaranteedOOMScoreAdj int = -997' 'guaranteedOOMScoreAdj int = 0'
    make WHAT="cmd/kubelet cmd/kube-proxy cmd/kube-scheduler" >"$work/make.log" 2>&1 \
      || { tail -n 40 "$work/make.log" >&2; die "node build failed; full log in $work/make.log"; }
    rm -rf "$NODE_BIN_DIR.tmp"; mkdir -p "$NODE_BIN_DIR.tmp"
    cp _output/local/bin/linux/amd64/kubelet _output/local/bin/linux/amd64/kube-proxy \
       _output/local/bin/linux/amd64/kube-scheduler "$NODE_BIN_DIR.tmp/"
    echo "$NODE_KEY" > "$NODE_BIN_DIR.tmp/KEY"
  )
  rm -rf "$NODE_BIN_DIR"; mv "$NODE_BIN_DIR.tmp" "$NODE_BIN_DIR"
  rm -rf "$work"
  say "built and cached in $NODE_BIN_DIR"
}

TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE_ROOT/target}

# The Rust side of the harness (e2e/src/control_plane.rs) starts and stops
# the processes; this script builds what it needs first.
control_plane_bin() {
  need cargo "the Rust toolchain (rustup)"
  local root; root=$(cd "$(dirname "$0")/.." && pwd)
  CARGO_TARGET_DIR=$TARGET_DIR cargo build -q --manifest-path "$root/Cargo.toml" -p fhir-operator-e2e --bin control-plane >&2 \
    || die "building the control-plane binary failed"
  echo "$TARGET_DIR/debug/control-plane"
}

cmd=${1:-}
case "$cmd" in
  build) cmd_build ;;
  build-node) cmd_build_node ;;
  up|run)
    cmd_build
    need openssl openssl
    case " ${*:2} " in *" --node "*) cmd_build_node ;; esac
    exec "$(control_plane_bin)" --dir "$STATE_DIR" "$cmd" "${@:2}" ;;
  down|env|status|crds|rbac)
    exec "$(control_plane_bin)" --dir "$STATE_DIR" "$cmd" ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2 ;;
esac
