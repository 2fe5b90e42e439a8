#!/usr/bin/env bash
# The Docker cluster (docker/docker-compose.yml) on a machine with no registry access and no
# systemd: a private dockerd and locally built stand-ins for the images the compose file names.
#
#   bash scripts/docker-cluster.sh up      # install, daemon, images, compose up, wait healthy
#   bash scripts/docker-cluster.sh down    # compose down -v, stop the daemon this script started
#
# Subcommands (each does what the ones before it need, and is safe to repeat):
#   install       apt-get install docker.io docker-compose debootstrap (root; when missing)
#   daemon-start  a private dockerd: its own data root, exec root, socket and pid file; the
#                 address pool pinned to 10.231.0.0/16 (see README, "Docker"). Its default
#                 bridge is docker0 (--bip): not for a machine whose own dockerd runs.
#   images        redis:7.0, python:3.11-slim and locustio/locust:2.47.0 imported from one
#                 Debian bookworm root filesystem (debootstrap), cached under $CACHE
#   up            the above, then `docker-compose up -d --build` and wait for every replica link
#   down          `docker-compose down -v`, then daemon-stop
#   daemon-stop   stop the dockerd whose pid is in $PIDFILE (and only that process)
#   env           print the DOCKER_HOST line to talk to the private daemon
#
# Nothing is pulled: the stand-ins carry the standard names, so the compose file is the one a
# user with a registry runs. The python stand-in is Debian's python3 (3.11) with the
# project's dependencies, hatchling and Locust preinstalled from a wheelhouse built on this
# host (`pip wheel`: PyPI is reachable from the host, not from containers), and pip set to
# no index: docker/Dockerfile's `pip install ".[fastapi]"` then installs the engine itself.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

STATE=${RSE_DOCKER_STATE:-/var/lib/rse-docker}
EXEC_ROOT=${RSE_DOCKER_EXEC_ROOT:-/run/rse-docker}
SOCKET=${RSE_DOCKER_SOCKET:-/run/rse-docker.sock}
PIDFILE=${RSE_DOCKER_PIDFILE:-/run/rse-docker.pid}
LOG=${RSE_DOCKER_LOG:-/var/log/rse-dockerd.log}
CACHE=${RSE_DOCKER_CACHE:-/var/cache/rse-docker}
# The documented private range: the daemon's default bridge and every network it allocates
# (the compose network pins 10.231.13.0/24 inside it).
POOL=10.231.0.0/16
BRIDGE_IP=10.231.0.1/24
PROJECT=${RSE_COMPOSE_PROJECT:-rse}
COMPOSE_FILE=$ROOT/docker/docker-compose.yml
LOCUST_VERSION=2.47.0
PACKAGES=redis-server,redis-tools,python3,python3-pip,python3-venv,python-is-python3,ca-certificates
export DOCKER_HOST=unix://$SOCKET

say() { echo "docker-cluster: $*" >&2; }

install() {
  if command -v dockerd >/dev/null && command -v docker-compose >/dev/null \
      && command -v debootstrap >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "missing dockerd/docker-compose/debootstrap and cannot install them (need root and apt-get)"
    exit 3
  fi
  say "installing docker.io docker-compose debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
}

daemon_answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

daemon_start() {
  install
  if daemon_answers; then
    return
  fi
  mkdir -p "$STATE" "$EXEC_ROOT" "$(dirname "$LOG")"
  # --iptables=false / --ip-forward=false: this daemon leaves the host's firewall, forwarding
  # and br_netfilter alone (other tools on the machine build bridges of their own). Containers
  # then reach each other and the host reaches them on the bridge, but they have no route to
  # the internet, which nothing here needs (images are built locally).
  say "starting dockerd (socket $SOCKET, data $STATE, log $LOG)"
  setsid dockerd --data-root "$STATE" --exec-root "$EXEC_ROOT" -H "unix://$SOCKET" \
    --pidfile "$PIDFILE" --default-address-pool "base=$POOL,size=24" --bip "$BRIDGE_IP" \
    --iptables=false --ip-forward=false >>"$LOG" 2>&1 </dev/null &
  local pid=$! i
  for i in $(seq 1 60); do
    if daemon_answers; then
      return
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      break
    fi
    sleep 0.5
  done
  say "dockerd did not start; the end of $LOG:"
  tail -n 15 "$LOG" >&2
  exit 4
}

daemon_stop() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null || true)
  # Only the process this pid file names, and only if it is a dockerd.
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]; then
    kill "$pid"
    for _ in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
  fi
  # dockerd leaves its default bridge behind; remove it once our daemon is gone, and only
  # if it carries our address (a docker0 of another daemon has its own).
  if ! daemon_answers && ip -4 addr show dev docker0 2>/dev/null | grep -q "inet $BRIDGE_IP "
  then
    ip link delete docker0
  fi
}

# What the stand-ins are made of: rebuilt when the package list, Locust or pyproject changes.
image_key() {
  { echo "$PACKAGES $LOCUST_VERSION v1"; cat "$ROOT/pyproject.toml"; } | sha256sum | cut -c1-16
}

image_is_current() {
  [ "$(docker image inspect --format '{{index .Config.Labels "rse.key"}}' "$1" 2>/dev/null)" \
    = "$2" ]
}

build_rootfs() {
  local key=$1 dir=$CACHE/rootfs-$1
  if [ -f "$dir.tar" ]; then
    return
  fi
  rm -rf "$dir" "$dir.tmp"
  mkdir -p "$CACHE"
  say "debootstrap bookworm into $dir (about a minute)"
  debootstrap --variant=minbase --include="$PACKAGES" bookworm "$dir.tmp" \
    >"$CACHE/debootstrap.log" 2>&1 || { tail -n 20 "$CACHE/debootstrap.log" >&2; exit 5; }
  mv "$dir.tmp" "$dir"
  say "building the wheelhouse on the host (engine dependencies, hatchling, locust)"
  rm -rf "$CACHE/wheels" && mkdir -p "$CACHE/wheels"
  [ -x "$ROOT/.venv/bin/python" ] || { say "no .venv: run scripts/setup.sh first"; exit 5; }
  "$ROOT/.venv/bin/python" -m pip wheel -q --disable-pip-version-check -w "$CACHE/wheels" \
    "$ROOT[fastapi]" hatchling "locust==$LOCUST_VERSION" >"$CACHE/wheels.log" 2>&1 \
    || { tail -n 20 "$CACHE/wheels.log" >&2; exit 5; }
  rm -f "$CACHE"/wheels/redis_session_engine-*.whl  # the image installs the engine itself
  mkdir -p "$dir/wheels"
  cp "$CACHE"/wheels/*.whl "$dir/wheels/"
  # Debian marks its python "externally managed"; python:3.11-slim's is not.
  rm -f "$dir"/usr/lib/python3*/EXTERNALLY-MANAGED
  chroot "$dir" /bin/sh -c \
    'pip install -q --no-index --root-user-action=ignore --find-links /wheels /wheels/*.whl'
  rm -rf "$dir/wheels" "$dir/var/cache/apt/archives/"*.deb "$dir/var/lib/apt/lists/"*
  # No index inside the images: nothing is pulled, and the Dockerfile's build of the engine
  # uses the hatchling installed here.
  printf '[global]\nno-index = true\nno-build-isolation = false\n' >"$dir/etc/pip.conf"
  mkdir -p "$dir/data" "$dir/srv" "$dir/home/locust"
  tar -C "$dir" -cf "$dir.tar.tmp" . && mv "$dir.tar.tmp" "$dir.tar"
  rm -rf "$dir"
}

images() {
  daemon_start
  local key
  key=$(image_key)
  if image_is_current redis:7.0 "$key" && image_is_current python:3.11-slim "$key" \
      && image_is_current "locustio/locust:$LOCUST_VERSION" "$key"; then
    return
  fi
  build_rootfs "$key"
  local tar=$CACHE/rootfs-$key.tar
  say "importing redis:7.0, python:3.11-slim, locustio/locust:$LOCUST_VERSION from $tar"
  docker import -c "LABEL rse.key=$key" -c 'WORKDIR /data' -c 'CMD ["redis-server"]' \
    "$tar" redis:7.0 >/dev/null
  docker import -c "LABEL rse.key=$key" -c 'WORKDIR /srv' -c 'CMD ["python3"]' \
    -c 'ENV PYTHONDONTWRITEBYTECODE=1' "$tar" python:3.11-slim >/dev/null
  docker import -c "LABEL rse.key=$key" -c 'WORKDIR /home/locust' \
    -c 'ENTRYPOINT ["locust"]' "$tar" "locustio/locust:$LOCUST_VERSION" >/dev/null
  # Old root filesystems of other keys are dead weight.
  find "$CACHE" -maxdepth 1 -name 'rootfs-*.tar' ! -name "rootfs-$key.tar" -delete
}

compose() { docker-compose -p "$PROJECT" -f "$COMPOSE_FILE" "$@"; }

up() {
  images
  compose build -q app
  compose up -d
  say "waiting for the app to be healthy"
  local id state
  id=$(compose ps -q app)
  for _ in $(seq 1 90); do
    state=$(docker inspect --format '{{.State.Health.Status}}' "$id")
    [ "$state" = healthy ] && break
    sleep 1
  done
  [ "$state" = healthy ] || { compose logs --tail 30 app >&2; exit 6; }
  say "up: redis://10.231.13.10:7000 (from this host), app $(compose port app 8000)"
}

down() {
  if daemon_answers; then
    compose down -v --remove-orphans
  fi
  daemon_stop
}

case ${1:-} in
  install) install ;;
  daemon-start) daemon_start ;;
  daemon-stop) daemon_stop ;;
  images) images ;;
  up) up ;;
  down) down ;;
  env) echo "export DOCKER_HOST=unix://$SOCKET" ;;
  *)
    echo "usage: $0 install|daemon-start|images|up|down|daemon-stop|env" >&2
    exit 2
    ;;
esac
