#!/usr/bin/env bash
# Set up a fresh machine: redis-server/redis-cli/openssl/wrk (Debian packages, when missing),
# .venv, and the engine with every extra. Idempotent and quiet; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
# openssl makes the TLS tests' certificates; wrk drives `python -m engine bench --http`.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null \
    || ! command -v openssl >/dev/null || ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq redis-server redis-tools openssl wrk >/dev/null
  else
    echo "missing: sudo apt-get install redis-server redis-tools openssl wrk" >&2
    exit 1
  fi
fi
# chromium screenshots the built documentation site (tests/test_docs.py); without it that
# one test skips, so a machine without root is not refused for it.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
  else
    echo "note: no chromium (sudo apt-get install chromium): the docs screenshot test skips" >&2
  fi
fi
# ip and nft: the cluster whose nodes are separate hosts (network namespaces, partitions).
# Root only; elsewhere those tests skip and say why, so nothing to install there.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    && { ! command -v ip >/dev/null || ! command -v nft >/dev/null; }; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq iproute2 nftables >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,fastapi,loadtest,charts,cli,prometheus,otel,docs,redis8]'
