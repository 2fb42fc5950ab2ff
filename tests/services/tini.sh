#!/usr/bin/env bash
# tini (the images' PID 1) for the deploy tests that run an image's ENTRYPOINT outside Docker.
#
#   eval "$(bash tests/services/tini.sh)"    find or install it; exports WORKER_TEST_TINI
#
# Only the export line goes to stdout; progress goes to stderr. Uses a tini already on PATH, else one
# installed earlier into .venv/bin, else takes it out of Debian's `tini` package (the package the
# images install): the .deb is unpacked, not installed. Set WORKER_TEST_TINI to use a tini of your own.
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { echo "tini.sh: $*" >&2; }

target=$PWD/.venv/bin/tini

if [ -n "${WORKER_TEST_TINI:-}" ] && [ -x "$WORKER_TEST_TINI" ]; then
  found=$WORKER_TEST_TINI
elif command -v tini >/dev/null 2>&1; then
  found=$(command -v tini)
elif [ -x "$target" ]; then
  found=$target
else
  if ! command -v apt-get >/dev/null 2>&1; then
    say "tini not found and apt-get is missing: install tini and put it on PATH"
    exit 1
  fi
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  chmod 755 "$work"   # apt's unprivileged download user must be able to write here
  say "downloading Debian's tini package"
  if ! (cd "$work" && apt-get download -qq tini >&2 2>/dev/null); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq >&2
    (cd "$work" && apt-get download -qq tini >&2)
  fi
  dpkg-deb -x "$work"/tini_*.deb "$work/root"
  mkdir -p "$(dirname "$target")"
  install -m 755 "$work/root/usr/bin/tini" "$target"
  found=$target
fi

say "using $("$found" --version 2>&1 | head -n 1) at $found"
echo "export WORKER_TEST_TINI=$found"
