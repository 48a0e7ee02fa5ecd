#!/usr/bin/env bash
# The S3-compatible server of the backup tests: s3s-fs (crates.io), built
# once into the cache. Prints the binary's path.
set -euo pipefail
cache=${FHIR_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fhir-operator}
version=0.14.1   # the newest release that builds with this toolchain (0.17 needs rustc 1.96)
root=$cache/tools/s3s-fs-$version
if [ ! -x "$root/bin/s3s-fs" ]; then
  echo "building s3s-fs $version into $root (once, about 3 minutes)" >&2
  cargo install --quiet --locked --features binary --root "$root" "s3s-fs@$version" >&2
fi
echo "$root/bin/s3s-fs"
