#!/usr/bin/env bash
# Container images of the local node's tests, built here (nothing is pulled):
#
#   fhir-operator-test/pause:<key>  the pod sandbox: one static binary
#                                   (e2e/images/pause.c) that sleeps until
#                                   SIGTERM/SIGINT and reaps children
#   fhir-operator-test/nginx:<key>  Debian bookworm minbase + nginx-light
#                                   (debootstrap), configured by
#                                   e2e/images/nginx.conf: any non-root uid,
#                                   read-only root, /tmp writable, port 8080
#   fhir-operator-test/runtime:<key> Debian bookworm minbase + ca-certificates,
#                                   libssl3 and PostgreSQL 15 (server and
#                                   client), the user postgres as uid 999
#                                   (as in the official PostgreSQL images)
#   fhir-operator-test/postgres:<key> runtime, PostgreSQL's programs on PATH,
#                                   USER 999: the database pods and the
#                                   backup/drill Jobs' dump and restore
#   fhir-operator-test/hfs:<key>    runtime + the Helios FHIR Server binary
#                                   (e2e/hfs.sh) and its search parameters
#                                   in its working directory /opt/hfs
#   fhir-operator-test/operator:<key> runtime + the operator binary given
#                                   with --operator (the gateway-metrics
#                                   sidecar and the backup agent)
#
# <key> is a hash of each image's inputs (the recipe in this script, the
# files under e2e/images/, the compiler or the package mirror). The root
# filesystems are cached as tarballs under <cache>/images, so a new Docker
# engine only imports them; the images on top of runtime are `docker build`s
# of a few files. Prints `<name>=<ref>` for each.
#
#   e2e/images.sh [build] [--operator BINARY]   build what is missing, print
#                                  the references (operator only when given)
#   e2e/images.sh refs [--operator BINARY]      print the references only
#
# Needs a running Docker engine; if none runs, one is started for the build
# and stopped afterwards. Needs root to install debootstrap and gcc.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE_ROOT=${FHIR_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fhir-operator}
IMAGE_CACHE=$CACHE_ROOT/images
REPO=fhir-operator-test
SUITE=bookworm

die() { echo "images: error: $*" >&2; exit 1; }
say() { echo "images: $*" >&2; }

# The first deb URI serving $SUITE in the machine's own apt sources (no host
# is hard-coded here).
mirror() {
  local src=/etc/apt/sources.list.d/debian.sources
  [ -f "$src" ] || die "no $src to take the Debian mirror from"
  awk -v suite="$SUITE" '
    /^$/ { if (ok && uri != "") { print uri; exit } ok = 0; uri = ""; deb = 0; next }
    /^Types:/ { deb = ($0 ~ /(^|[ \t])deb([ \t]|$)/) }
    /^URIs:/ { uri = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
    END { if (ok && deb && uri != "") print uri }
  ' "$src" | head -n1
}

hash() { sha256sum | cut -c1-16; }

pause_key() {
  { echo "pause recipe v1: gcc -static -O2 -s; ENTRYPOINT /pause"; cat "$HERE/images/pause.c"; gcc --version | head -n1; } | hash
}

nginx_key() {
  { echo "nginx recipe v2 (empty /tmp): debootstrap --variant=minbase --include=nginx-light $SUITE; USER 65532; CMD nginx -e stderr"
    mirror; cat "$HERE/images/nginx.conf"; } | hash
}

RUNTIME_PACKAGES=ca-certificates,libssl3,postgresql-15,postgresql-client-15
PG_BIN=/usr/lib/postgresql/15/bin

runtime_key() {
  { echo "runtime recipe v1: debootstrap --variant=minbase --include=$RUNTIME_PACKAGES $SUITE; postgres uid/gid 999"
    mirror; } | hash
}

postgres_key() { { echo "postgres recipe v1: PATH=$PG_BIN; USER 999"; runtime_key; } | hash; }

hfs_key() {
  { echo "hfs recipe v1: /opt/hfs/hfs, /opt/hfs/data, WORKDIR /opt/hfs, USER 65532"; runtime_key
    cat "$(hfs_binary)" "$(dirname "$(hfs_binary)")"/data/* | sha256sum; } | hash
}

operator_key() {
  { echo "operator recipe v1: /usr/local/bin/fhir-operator, USER 65532"; runtime_key; sha256sum < "$OPERATOR"; } | hash
}

HFS_BINARY=
hfs_binary() {
  [ -n "$HFS_BINARY" ] || HFS_BINARY=$("$HERE/hfs.sh" | tail -n1)
  echo "$HFS_BINARY"
}

OPERATOR=
refs() {
  echo "pause=$REPO/pause:$(pause_key)"
  echo "nginx=$REPO/nginx:$(nginx_key)"
  echo "runtime=$REPO/runtime:$(runtime_key)"
  echo "postgres=$REPO/postgres:$(postgres_key)"
  echo "hfs=$REPO/hfs:$(hfs_key)"
  [ -z "$OPERATOR" ] || echo "operator=$REPO/operator:$(operator_key)"
}
ref_of() { refs | sed -n "s/^$1=//p"; }

ensure_tools() {
  local missing=()
  command -v gcc >/dev/null || missing+=(gcc)
  [ -f /usr/lib/x86_64-linux-gnu/libc.a ] || compgen -G '/usr/lib/*/libc.a' >/dev/null || missing+=(libc6-dev)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v dockerd >/dev/null || missing+=(docker.io)
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing Debian packages; as root: apt-get install -y ${missing[*]}"
    say "installing Debian packages: ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  fi
}

STARTED_DOCKERD=
ensure_docker() {
  docker info >/dev/null 2>&1 && return 0
  say "no Docker engine answers; starting dockerd for the build"
  mkdir -p "$IMAGE_CACHE"
  setsid dockerd >"$IMAGE_CACHE/dockerd.log" 2>&1 </dev/null &
  STARTED_DOCKERD=$!
  trap stop_docker EXIT
  for _ in $(seq 1 300); do
    docker info >/dev/null 2>&1 && return 0
    kill -0 "$STARTED_DOCKERD" 2>/dev/null || { tail -n 20 "$IMAGE_CACHE/dockerd.log" >&2; die "dockerd exited"; }
    sleep 0.1
  done
  die "dockerd did not answer within 30 s (log: $IMAGE_CACHE/dockerd.log)"
}

stop_docker() {
  [ -n "$STARTED_DOCKERD" ] || return 0
  kill -TERM "$STARTED_DOCKERD" 2>/dev/null || true
  for _ in $(seq 1 150); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$STARTED_DOCKERD" 2>/dev/null || true
}

has_image() { docker image inspect "$1" >/dev/null 2>&1; }

# prune NAME REF: other keys of this image (tags and cached tarballs) are
# outdated; a tag still used by a container stays.
prune() {
  local name=$1 ref=$2 key=${2##*:} f
  docker images --format '{{.Repository}}:{{.Tag}}' "$REPO/$name" | grep -vxF "$ref" \
    | while read -r old; do docker rmi "$old" >/dev/null 2>&1 && say "removed outdated $old"; done || true
  for f in "$IMAGE_CACHE/$name"-*.tar; do
    [ -e "$f" ] && [ "$f" != "$IMAGE_CACHE/$name-$key.tar" ] && rm -f "$f"
  done
  return 0
}

# bootstrap NAME PACKAGES: a Debian $SUITE minbase root filesystem with
# PACKAGES (comma-separated) in a new work directory (printed; the root is
# its root/).
bootstrap() {
  local name=$1 packages=$2 uri work
  uri=$(mirror); [ -n "$uri" ] || die "no deb URI for $SUITE in the apt sources"
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  work=$(mktemp -d "${TMPDIR:-/tmp}/fhir-$name-image.XXXXXX")
  debootstrap --variant=minbase --include="$packages" "$SUITE" "$work/root" "$uri" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed (log: $work/debootstrap.log)"; }
  echo "$work"
}

# pack WORK TARBALL: drops caches and docs, leaves /tmp empty and writable
# by any uid, writes the tarball and removes the work directory.
pack() {
  local work=$1 tarball=$2
  rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"* \
    "$work/root/usr/share/doc" "$work/root/usr/share/man" "$work/root/usr/share/locale"
  find "$work/root/tmp" -mindepth 1 -delete
  chmod 1777 "$work/root/tmp"
  tar --numeric-owner -C "$work/root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
  rm -rf "$work"
}

build_pause() {
  local key ref tarball work
  key=$(pause_key); ref=$REPO/pause:$key; tarball=$IMAGE_CACHE/pause-$key.tar
  has_image "$ref" && return 0
  if [ ! -f "$tarball" ]; then
    say "building $ref"
    work=$(mktemp -d)
    gcc -static -O2 -s -o "$work/pause" "$HERE/images/pause.c" || die "compiling pause.c failed"
    "$work/pause" -v >/dev/null || die "the pause binary does not run"
    tar -C "$work" -cf "$tarball.tmp" pause && mv "$tarball.tmp" "$tarball"
    rm -rf "$work"
  fi
  docker import -c 'ENTRYPOINT ["/pause"]' "$tarball" "$ref" >/dev/null || die "docker import $ref failed"
  say "imported $ref"
}

build_nginx() {
  local key ref tarball work uri
  key=$(nginx_key); ref=$REPO/nginx:$key; tarball=$IMAGE_CACHE/nginx-$key.tar
  has_image "$ref" && return 0
  if [ ! -f "$tarball" ]; then
    say "building $ref (debootstrap $SUITE minbase + nginx-light, about 2 minutes)"
    work=$(bootstrap nginx nginx-light)
    install -m 0644 "$HERE/images/nginx.conf" "$work/root/etc/nginx/nginx.conf"
    chroot "$work/root" /usr/sbin/nginx -t -e stderr -c /etc/nginx/nginx.conf >/dev/null 2>&1 \
      || { chroot "$work/root" /usr/sbin/nginx -t -e stderr -c /etc/nginx/nginx.conf; die "nginx -t failed in the image"; }
    # `nginx -t` made its temporary directories (and pid file) under /tmp
    # as root: pack empties it.
    pack "$work" "$tarball"
  fi
  docker import -c 'USER 65532:65532' -c 'EXPOSE 8080' \
    -c 'CMD ["/usr/sbin/nginx", "-e", "stderr", "-g", "daemon off;"]' "$tarball" "$ref" >/dev/null \
    || die "docker import $ref failed"
  say "imported $ref"
}

build_runtime() {
  local key ref tarball work uri
  key=$(runtime_key); ref=$REPO/runtime:$key; tarball=$IMAGE_CACHE/runtime-$key.tar
  has_image "$ref" && return 0
  if [ ! -f "$tarball" ]; then
    say "building $ref (debootstrap $SUITE minbase + PostgreSQL 15, about 3 minutes)"
    work=$(bootstrap runtime "$RUNTIME_PACKAGES")
    # uid and gid 999 as in the official images (the Jobs run as 999).
    chroot "$work/root" sh -ec 'groupmod -g 999 postgres && usermod -u 999 -g 999 postgres
      chown -R 999:999 /var/lib/postgresql /var/run/postgresql /etc/postgresql /var/log/postgresql'
    pack "$work" "$tarball"
  fi
  docker import "$tarball" "$ref" >/dev/null || die "docker import $ref failed"
  say "imported $ref"
}

# docker_build NAME REF DOCKERFILE-TEXT [FILE DEST]...: a small image on top
# of runtime; the files are hard-linked (or copied) into the build context.
docker_build() {
  local name=$1 ref=$2 dockerfile=$3 work
  shift 3
  has_image "$ref" && return 0
  work=$(mktemp -d "${TMPDIR:-/tmp}/fhir-$name-image.XXXXXX")
  while [ $# -ge 2 ]; do
    mkdir -p "$work/ctx/$(dirname "$2")"
    cp -a "$1" "$work/ctx/$2"
    shift 2
  done
  mkdir -p "$work/ctx"
  printf '%s\n' "$dockerfile" >"$work/ctx/Dockerfile"
  DOCKER_BUILDKIT=0 docker build -q -t "$ref" "$work/ctx" >"$work/build.log" 2>&1 \
    || { cat "$work/build.log" >&2; rm -rf "$work"; die "docker build $ref failed"; }
  rm -rf "$work"
  say "built $ref"
}

build_layers() {
  local runtime
  runtime=$(ref_of runtime)
  docker_build postgres "$(ref_of postgres)" "FROM $runtime
ENV PATH=$PG_BIN:/usr/local/bin:/usr/bin:/bin
USER 999:999
CMD [\"postgres\"]"
  docker_build hfs "$(ref_of hfs)" "FROM $runtime
COPY hfs /opt/hfs/hfs
COPY data /opt/hfs/data
WORKDIR /opt/hfs
USER 65532:65532
EXPOSE 8080
ENTRYPOINT [\"/opt/hfs/hfs\"]" "$(hfs_binary)" hfs "$(dirname "$(hfs_binary)")/data" data
  if [ -n "$OPERATOR" ]; then
    docker_build operator "$(ref_of operator)" "FROM $runtime
COPY fhir-operator /usr/local/bin/fhir-operator
USER 65532:65532
ENTRYPOINT [\"/usr/local/bin/fhir-operator\"]" "$OPERATOR" fhir-operator
  fi
}

command=build
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then command=$1; shift; fi
while [ $# -gt 0 ]; do
  case "$1" in
    --operator) OPERATOR=$(realpath "$2"); [ -x "$OPERATOR" ] || die "--operator $2: no such executable"; shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done

case "$command" in
  refs) refs ;;
  build)
    ensure_tools
    mkdir -p "$IMAGE_CACHE"
    ensure_docker
    build_pause
    build_nginx
    build_runtime
    build_layers
    for name in pause nginx runtime postgres hfs ${OPERATOR:+operator}; do prune "$name" "$(ref_of "$name")"; done
    refs ;;
  *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2 ;;
esac
