#!/usr/bin/env bash
# Rotates a real PostgreSQL password on this machine: starts a throwaway PostgreSQL on a free
# loopback port, writes a .env for it, runs `llmtrace-rotator rotate`, shows the report and
# proves the new password logs in and the old one no longer does. Cleans up after itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -x "$pg_bin/initdb" ] || { echo "PostgreSQL server binaries not found: run scripts/test.sh once, or apt-get install postgresql" >&2; exit 1; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

cargo build --quiet
bin=$PWD/target/debug/llmtrace-rotator

work=$(mktemp -d /tmp/rotator-demo-XXXXXX)
chmod 755 "$work"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cleanup() { as_pg "$pg_bin/pg_ctl" -D "$work/pg" stop -m immediate >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

admin_password=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
old_password=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
mkdir -p "$work/pg" && printf '%s\n' "$admin_password" > "$work/pwfile"
[ "$(id -u)" = 0 ] && chown -R postgres "$work/pg" "$work/pwfile"
echo "== starting a throwaway PostgreSQL on 127.0.0.1:$port"
as_pg "$pg_bin/initdb" -D "$work/pg" -U postgres --pwfile="$work/pwfile" -A scram-sha-256 >/dev/null
as_pg "$pg_bin/pg_ctl" -D "$work/pg" -l "$work/pg/log" -w \
  -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$work/pg" start >/dev/null
export PGPASSWORD=$admin_password
psql -h 127.0.0.1 -p "$port" -U postgres -qc "CREATE ROLE llmtrace LOGIN PASSWORD '$old_password'" -c "CREATE DATABASE llmtrace OWNER llmtrace"
unset PGPASSWORD

cat > "$work/.env" <<ENV
# LLMTrace proxy settings
LLMTRACE_POSTGRES_URL=postgres://llmtrace:$old_password@127.0.0.1:$port/llmtrace
LLMTRACE_REDIS_URL=redis://redis:6379/0
ENV
cat > "$work/rotator.toml" <<TOML
[rotator]
journal = "sqlite://journal.db"
journal_key = "env:ROTATOR_JOURNAL_KEY"

[[target]]
name = "postgres"
kind = "postgres"
address = "127.0.0.1:$port"
database = "llmtrace"
user = "llmtrace"
admin = { user = "postgres", password = "env:PG_ADMIN_PASSWORD" }
sslmode = "disable"
consumers = ["proxy"]

  [[target.store]]
  kind = "file"
  path = ".env"
  key = "LLMTRACE_POSTGRES_URL"

[[consumer]]
name = "proxy"
kind = "command"
command = ["sh", "-c", "echo '(the proxy would restart here: docker compose up -d --force-recreate proxy)'"]
TOML

export ROTATOR_JOURNAL_KEY=$(head -c 32 /dev/urandom | base64)
export PG_ADMIN_PASSWORD=$admin_password
echo "== .env before (password masked)"
sed -E 's#(://[^:]*:)[^@]*@#\1****@#' "$work/.env"
echo "== llmtrace-rotator rotate --config rotator.toml"
start=$(date +%s%N)
"$bin" rotate --config "$work/rotator.toml"
echo "   (wall time of the whole command: $(( ($(date +%s%N) - start) / 1000000 )) ms)"
echo "== .env after (password masked)"
sed -E 's#(://[^:]*:)[^@]*@#\1****@#' "$work/.env"

new_url=$(sed -n 's/^LLMTRACE_POSTGRES_URL=//p' "$work/.env")
echo "== the new password from .env logs in:"
psql "$new_url" -Atc "SELECT 'logged in as ' || current_user"
echo "== the old password no longer does:"
if PGPASSWORD=$old_password psql -h 127.0.0.1 -p "$port" -U llmtrace -d llmtrace -Atc 'SELECT 1' 2>/dev/null; then
  echo "unexpected: the old password still logs in" >&2; exit 1
else
  echo "refused, as it should be"
fi
echo "== llmtrace-rotator history"
"$bin" history --config "$work/rotator.toml" --limit 1
