#!/usr/bin/env bash
# Helm for the tests, without a helm binary: a Python virtualenv holding the
# pinned PyPI package helm-python-sdk (Helm v4's Go SDK behind a C ABI),
# outside the clone in $FHIR_OPERATOR_CACHE/venv. Idempotent; safe to run from
# several test processes at once. Prints the virtualenv's python.
set -euo pipefail

HELM_PYTHON_SDK_VERSION=0.2.2

cache=${FHIR_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fhir-operator}
venv=$cache/venv
mkdir -p "$cache"

installed() {
  "$venv/bin/python" - "$HELM_PYTHON_SDK_VERSION" 2>/dev/null <<'PY'
import sys, helm_python
sys.exit(0 if helm_python.__version__ == sys.argv[1] else 1)
PY
}

if ! installed; then
  exec 9>"$cache/venv.lock"
  flock 9
  if ! installed; then
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
      echo "e2e/helm.sh: python3 with venv is missing: apt-get install python3 python3-venv" >&2
      exit 1
    fi
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "helm-python-sdk==$HELM_PYTHON_SDK_VERSION" >&2
    installed || { echo "e2e/helm.sh: helm-python-sdk $HELM_PYTHON_SDK_VERSION did not install" >&2; exit 1; }
  fi
fi
echo "$venv/bin/python"
