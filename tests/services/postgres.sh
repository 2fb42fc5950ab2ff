#!/usr/bin/env bash
# A throwaway PostgreSQL server for the ledger tests, on 127.0.0.1 only, with its data under /tmp.
#
#   eval "$(bash tests/services/postgres.sh)"    start it (or reuse the running one); exports
#                                                WORKER_TEST_POSTGRES_URL for the test suite
#   bash tests/services/postgres.sh stop         stop it and delete its data
#
# Only the export line goes to stdout; progress goes to stderr. Installs Debian's postgresql when no
# server binaries are found. Durability is switched off (fsync=off): the data is disposable.
set -euo pipefail

port=${WORKER_TEST_POSTGRES_PORT:-55432}
base=${WORKER_TEST_POSTGRES_DIR:-/tmp/worker-test-postgres}
database=worker_test
data=$base/data

say() { echo "postgres.sh: $*" >&2; }

server_bin_dir() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  done
  if command -v initdb >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v initdb)")"; return 0; fi
  return 1
}

if ! bin=$(server_bin_dir); then
  say "installing PostgreSQL (apt-get)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >&2
  bin=$(server_bin_dir)
fi

# initdb and postgres refuse to run as root; run them as the `postgres` user the package creates.
as_owner=()
if [ "$(id -u)" -eq 0 ]; then
  as_owner=(runuser -u postgres --)
fi

if [ "${1:-start}" = "stop" ]; then
  if [ -f "$data/PG_VERSION" ]; then
    "${as_owner[@]}" "$bin/pg_ctl" -D "$data" -m fast -w stop >&2 || true
  fi
  rm -rf "$base"
  say "stopped"
  exit 0
fi

if ! "${as_owner[@]}" "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    say "port $port is taken by another program; set WORKER_TEST_POSTGRES_PORT"
    exit 1
  fi
  rm -rf "$base"
  mkdir -p "$base"
  [ "$(id -u)" -eq 0 ] && chown postgres: "$base"
  say "initialising a cluster in $data"
  "${as_owner[@]}" "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
  say "starting on 127.0.0.1:$port"
  "${as_owner[@]}" "$bin/pg_ctl" -D "$data" -l "$base/server.log" -w -t 60 \
    -o "-h 127.0.0.1 -p $port -k $base -c fsync=off -c full_page_writes=off -c max_connections=200" \
    start >&2
fi

psql=("$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -v ON_ERROR_STOP=1 -qtA)
if [ "$("${psql[@]}" -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$database'")" != "1" ]; then
  "${psql[@]}" -d postgres -c "CREATE DATABASE $database" >&2
fi

echo "export WORKER_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:$port/$database"
