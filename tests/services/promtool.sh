#!/usr/bin/env bash
# promtool (Prometheus' config and rule checker) for the deploy tests.
#
#   eval "$(bash tests/services/promtool.sh)"    find or install it; exports WORKER_TEST_PROMTOOL
#
# Only the export line goes to stdout; progress goes to stderr. Uses a promtool already on PATH, else
# one installed earlier into .venv/bin, else takes it out of Debian's `prometheus` package: the .deb
# is unpacked, not installed, so no Prometheus server, service or system user comes with it (promtool
# is a static binary). Set WORKER_TEST_PROMTOOL to use a promtool of your own.
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { echo "promtool.sh: $*" >&2; }

target=$PWD/.venv/bin/promtool

if [ -n "${WORKER_TEST_PROMTOOL:-}" ] && [ -x "$WORKER_TEST_PROMTOOL" ]; then
  found=$WORKER_TEST_PROMTOOL
elif command -v promtool >/dev/null 2>&1; then
  found=$(command -v promtool)
elif [ -x "$target" ]; then
  found=$target
else
  if ! command -v apt-get >/dev/null 2>&1; then
    say "promtool not found and apt-get is missing: install Prometheus (it ships promtool) and put promtool on PATH"
    exit 1
  fi
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  chmod 755 "$work"   # apt's unprivileged download user must be able to write here
  say "downloading Debian's prometheus package for its promtool"
  if ! (cd "$work" && apt-get download -qq prometheus >&2 2>/dev/null); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq >&2
    (cd "$work" && apt-get download -qq prometheus >&2)
  fi
  dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
  mkdir -p "$(dirname "$target")"
  install -m 755 "$work/root/usr/bin/promtool" "$target"
  found=$target
fi

say "using $("$found" --version 2>&1 | head -n 1) at $found"
echo "export WORKER_TEST_PROMTOOL=$found"
