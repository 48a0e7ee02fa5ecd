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
#
# <key> is a hash of each image's inputs (the recipe in this script, the
# files under e2e/images/, the compiler or the package mirror). The root
# filesystems are cached as tarballs under <cache>/images, so a new Docker
# engine only imports them. Prints `pause=<ref>` and `nginx=<ref>`.
#
#   e2e/images.sh          build what is missing, print the references
#   e2e/images.sh refs     print the references only (no Docker needed)
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

refs() {
  echo "pause=$REPO/pause:$(pause_key)"
  echo "nginx=$REPO/nginx:$(nginx_key)"
}

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
    uri=$(mirror); [ -n "$uri" ] || die "no deb URI for $SUITE in the apt sources"
    [ "$(id -u)" = 0 ] || die "debootstrap needs root"
    say "building $ref (debootstrap $SUITE minbase + nginx-light, about 2 minutes)"
    work=$(mktemp -d "${TMPDIR:-/tmp}/fhir-nginx-image.XXXXXX")
    debootstrap --variant=minbase --include=nginx-light "$SUITE" "$work/root" "$uri" >"$work/debootstrap.log" 2>&1 \
      || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed (log: $work/debootstrap.log)"; }
    install -m 0644 "$HERE/images/nginx.conf" "$work/root/etc/nginx/nginx.conf"
    rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"* \
      "$work/root/usr/share/doc" "$work/root/usr/share/man" "$work/root/usr/share/locale"
    chroot "$work/root" /usr/sbin/nginx -t -e stderr -c /etc/nginx/nginx.conf >/dev/null 2>&1 \
      || { chroot "$work/root" /usr/sbin/nginx -t -e stderr -c /etc/nginx/nginx.conf; die "nginx -t failed in the image"; }
    # `nginx -t` made its temporary directories (and pid file) under /tmp
    # as root: the image's /tmp must be empty and writable by any uid.
    find "$work/root/tmp" -mindepth 1 -delete
    chmod 1777 "$work/root/tmp"
    tar --numeric-owner -C "$work/root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$work"
  fi
  docker import -c 'USER 65532:65532' -c 'EXPOSE 8080' \
    -c 'CMD ["/usr/sbin/nginx", "-e", "stderr", "-g", "daemon off;"]' "$tarball" "$ref" >/dev/null \
    || die "docker import $ref failed"
  say "imported $ref"
}

case "${1:-build}" in
  refs) refs ;;
  build)
    ensure_tools
    mkdir -p "$IMAGE_CACHE"
    ensure_docker
    build_pause
    build_nginx
    prune pause "$(refs | sed -n 's/^pause=//p')"
    prune nginx "$(refs | sed -n 's/^nginx=//p')"
    refs ;;
  *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2 ;;
esac
