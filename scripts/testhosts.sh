#!/usr/bin/env bash
# Build the test-host images and create or remove the podman hosts of inventories/local.
#
#   scripts/testhosts.sh images        build (or reuse) the images
#   scripts/testhosts.sh up            create the local hosts: one Redis host and two worker hosts
#   scripts/testhosts.sh down          remove them and their network
#
# SIDEKIQ_OPS_HOSTS_PREFIX=abc names the hosts abc-redis, abc-worker1, abc-worker2 on network abc-net.
#   scripts/testhosts.sh env           print the environment podman needs (source it)
#
# The hosts are unprivileged podman containers with systemd as PID 1. Images are built from Debian bookworm with
# debootstrap, without any container registry, and reused until their inputs change.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CONTAINERS_CONF="$ROOT/tests/hosts/containers.conf"
CACHE="$ROOT/.cache/testhosts"

BASE_IMAGE="localhost/sidekiq-ops/base:bookworm"
HOST_IMAGE="localhost/sidekiq-ops/host:bookworm"
PREBAKED_IMAGE="localhost/sidekiq-ops/prebaked:bookworm"
BASE_PACKAGES="systemd,systemd-sysv,python3,dbus,sudo"
HOST_PACKAGES="python3-apt procps iproute2 ca-certificates"
# Baked into the prebaked image so most runs skip the slow installs; the molecule scenario for the redis
# role starts from HOST_IMAGE to cover the install from scratch.
PREBAKED_PACKAGES="redis-server redis-tools ruby ruby-sidekiq python3-redis"

# SIDEKIQ_OPS_HOSTS_PREFIX gives a second set of hosts (for a test that must not touch inventories/local);
# the default "sko" is the set inventories/local names.
PREFIX="${SIDEKIQ_OPS_HOSTS_PREFIX:-sko}"
case "$PREFIX" in
  ''|*[!a-z0-9-]*) echo "SIDEKIQ_OPS_HOSTS_PREFIX=$PREFIX is invalid; use lowercase letters, digits and '-'" >&2; exit 2 ;;
esac
if [ "$PREFIX" = "sko" ]; then NETWORK="sidekiq-ops-local"; else NETWORK="$PREFIX-net"; fi
LOCAL_HOSTS=("$PREFIX-redis" "$PREFIX-worker1" "$PREFIX-worker2")

log() { printf '[testhosts] %s\n' "$*" >&2; }

# Print the Debian mirror this machine's apt already uses; nothing is hard-coded here.
debian_mirror() {
  local uri=""
  if [ -n "${DEBIAN_MIRROR:-}" ]; then
    echo "$DEBIAN_MIRROR"
    return
  fi
  if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
    uri="$(awk '
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") { print uri; exit } }
    ' /etc/apt/sources.list.d/*.sources)"
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri="$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list)"
  fi
  if [ -z "$uri" ]; then
    log "no Debian bookworm mirror found in this machine's apt sources; set DEBIAN_MIRROR to one and run again"
    exit 1
  fi
  echo "$uri"
}

image_label() {
  podman image inspect --format '{{ index .Labels "sidekiq-ops.inputs" }}' "$1" 2>/dev/null || true
}

build_base() {
  local inputs="base:$BASE_PACKAGES"
  if [ "$(image_label "$BASE_IMAGE")" = "$inputs" ]; then
    log "reusing $BASE_IMAGE"
    return
  fi
  local rootfs="$CACHE/rootfs"
  # A killed earlier run may have left a half-built root file system behind.
  rm -rf "$rootfs"
  mkdir -p "$rootfs"
  log "debootstrap bookworm into $rootfs (about a minute)"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$(debian_mirror)" \
    > "$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
  tar -C "$rootfs" -c . | podman import \
    --change 'CMD ["/sbin/init"]' --change 'STOPSIGNAL SIGRTMIN+3' \
    --change "LABEL sidekiq-ops.inputs=$inputs" - "$BASE_IMAGE" >/dev/null 2>&1
  rm -rf "$rootfs"
}

build_layer() {
  local from="$1" image="$2" packages="$3"
  local inputs="$from:$(image_label "$from")+$packages"
  if [ "$(image_label "$image")" = "$inputs" ]; then
    log "reusing $image"
    return
  fi
  log "building $image"
  local context="$CACHE/context-${image##*/}"
  rm -rf "$context"
  mkdir -p "$context"
  cat > "$context/Containerfile" <<CONTAINERFILE
FROM $from
RUN apt-get update -q \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
# Packages may enable services (redis-server); the roles decide what runs on each host.
RUN if [ -e /lib/systemd/system/redis-server.service ]; then systemctl disable redis-server.service; fi
LABEL sidekiq-ops.inputs="$inputs"
CMD ["/sbin/init"]
STOPSIGNAL SIGRTMIN+3
CONTAINERFILE
  podman build --quiet --tag "$image" "$context" >/dev/null
  rm -rf "$context"
}

build_images() {
  mkdir -p "$CACHE"
  build_base
  build_layer "$BASE_IMAGE" "$HOST_IMAGE" "$HOST_PACKAGES"
  build_layer "$HOST_IMAGE" "$PREBAKED_IMAGE" "$PREBAKED_PACKAGES"
}

remove_hosts() {
  local name
  for name in "${LOCAL_HOSTS[@]}"; do
    podman rm --force --time 5 "$name" >/dev/null 2>&1 || true
  done
  podman network rm --force "$NETWORK" >/dev/null 2>&1 || true
}

wait_for_systemd() {
  local name="$1" state="" attempt
  for attempt in $(seq 1 60); do
    state="$(podman exec "$name" systemctl is-system-running 2>/dev/null || true)"
    case "$state" in
      running|degraded) return 0 ;;
    esac
    sleep 0.5
  done
  log "$name: systemd did not finish booting (state: ${state:-unknown})"
  return 1
}

create_hosts() {
  build_images
  remove_hosts
  podman network create "$NETWORK" >/dev/null
  local name
  for name in "${LOCAL_HOSTS[@]}"; do
    podman run -d --name "$name" --hostname "$name" --network "$NETWORK" --systemd=always \
      --label sidekiq-ops.testhost=local "$PREBAKED_IMAGE" /sbin/init >/dev/null
  done
  for name in "${LOCAL_HOSTS[@]}"; do
    wait_for_systemd "$name"
  done
  log "hosts up on network $NETWORK: ${LOCAL_HOSTS[*]}"
}

case "${1:-}" in
  images) build_images ;;
  up) create_hosts ;;
  down) remove_hosts ;;
  env) echo "export CONTAINERS_CONF=$CONTAINERS_CONF" ;;
  *) echo "usage: $0 images|up|down|env" >&2; exit 2 ;;
esac
