#!/usr/bin/env bash
# The store benchmark: one gateway on SQLite, one on PostgreSQL, and two
# replicas on one PostgreSQL with the load spread over them, side by side in
# one run, in front of an upstream answering from memory (nginx, as in
# benches/gateway.sh). Per target: calls/s at 32 connections, p50 one call
# at a time, p50 and p99 at 1,000 calls/s, the gateway's CPU per call, the
# PostgreSQL server's CPU per call, and PostgreSQL round trips per call
# (transactions counted by pg_stat_database: the writer's pipelined batch is
# one round trip and one transaction, so is a lease; reads are not on the
# calls' path). Method and results: docs/benchmarks.md and docs/scaling.md.
# Run: benches/replicas.sh (root: installs nginx, wrk, postgresql-15).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx wrk
fi
pg_bin=${TOKENWARDEN_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}
cargo build --release --locked --bin tokenwarden >/dev/null
cargo bench --locked --bench load --no-run >/dev/null 2>&1
load=$(ls -t target/release/deps/load-* | grep -v '\.d$' | head -n 1)

dir=$(mktemp -d /tmp/tokenwarden-replicas.XXXXXX)
chmod 755 "$dir"
pids=()
as_pg() { if [ "$(id -u)" = 0 ]; then setpriv --reuid=nobody --regid=nogroup --clear-groups "$@"; else "$@"; fi; }
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$dir/nginx.pid" ] && kill "$(cat "$dir/nginx.pid")" 2>/dev/null || true
  [ -d "$dir/pg" ] && as_pg "$pg_bin/pg_ctl" -D "$dir/pg" stop -m immediate >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_JSON=$(free_port); UP_SSE=$(free_port); PG=$(free_port)

cat > "$dir/nginx.conf" <<NGINX
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log;
daemon on;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP_JSON; types { } default_type application/json;
           location / { root $repo/benches/fixtures; try_files /chat.json =404; error_page 405 =200 \$uri; } }
  server { listen 127.0.0.1:$UP_SSE; types { } default_type "text/event-stream; charset=utf-8";
           location / { root $repo/benches/fixtures; try_files /chat.sse =404; error_page 405 =200 \$uri; } }
}
NGINX
nginx -c "$dir/nginx.conf"

# PostgreSQL with its defaults (fsync and synchronous_commit on).
mkdir -p "$dir/pg" && [ "$(id -u)" = 0 ] && chown nobody:nogroup "$dir/pg"
as_pg "$pg_bin/initdb" -D "$dir/pg" -U postgres -A trust -E UTF8 --locale=C >/dev/null
as_pg "$pg_bin/pg_ctl" -D "$dir/pg" -l "$dir/pg/log" -w \
  -o "-p $PG -k $dir/pg -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
psql() { "$pg_bin/psql" -h 127.0.0.1 -p "$PG" -U postgres -qAt "$@"; }
for db in single quick pair; do psql -c "CREATE DATABASE $db"; done
# The same server, one database with asynchronous commits (PostgreSQL's
# own setting: a commit returns before its WAL is flushed to disk).
psql -c "ALTER DATABASE quick SET synchronous_commit = off"

KEY_JSON=tw-bench-json-000000000001
KEY_SSE=tw-bench-sse-0000000000001
gateway() { # name, port, store url
  cat > "$dir/$1.toml" <<TOML
[server]
listen = "127.0.0.1:$2"
[store]
url = "$3"
[upstreams.json]
base_url = "http://127.0.0.1:$UP_JSON/v1"
api_key = "sk-bench"
[upstreams.sse]
base_url = "http://127.0.0.1:$UP_SSE/v1"
api_key = "sk-bench"
[[orgs]]
name = "bench"
[[orgs.projects]]
name = "json"
upstream = "json"
keys = ["$KEY_JSON"]
[[orgs.projects]]
name = "sse"
upstream = "sse"
keys = ["$KEY_SSE"]
[program.groups.mini]
daily_tokens = 1000000000000
TOML
  target/release/tokenwarden serve --config "$dir/$1.toml" >"$dir/$1.out" 2>"$dir/$1.err" &
  pids+=("$!")
  eval "pid_$1=$!"
  for _ in $(seq 100); do grep -q listening "$dir/$1.out" 2>/dev/null && break; sleep 0.1; done
}
P_SQLITE=$(free_port); P_PG=$(free_port); P_QUICK=$(free_port); P_A=$(free_port); P_B=$(free_port)
gateway sqlite "$P_SQLITE" "sqlite://$dir/ledger.db"
gateway pg "$P_PG" "postgres://postgres@127.0.0.1:$PG/single?sslmode=disable"
gateway quick "$P_QUICK" "postgres://postgres@127.0.0.1:$PG/quick?sslmode=disable"
gateway a "$P_A" "postgres://postgres@127.0.0.1:$PG/pair?sslmode=disable"
gateway b "$P_B" "postgres://postgres@127.0.0.1:$PG/pair?sslmode=disable"

cpu_ticks() { local t=0; for p in "$@"; do t=$(( t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0) )); done; echo "$t"; }
pg_pids() { pgrep -u nobody -f "postgres" 2>/dev/null || pgrep -f "postgres:" ; }
xacts() { # database -> transactions committed and rolled back so far
  if [ "$1" = - ]; then echo 0; return; fi
  # Backends report their counts at most once a second.
  sleep 1.5
  psql -c "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '$1'"
}
wrk_lua() { # body file, key
  cat > "$dir/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $2"
local f = io.open("$1", "rb"); wrk.body = f:read("*a"); f:close()
LUA
}
us() { awk '{v = $1; if (v ~ /ms$/) {sub("ms", "", v); v *= 1000} else if (v ~ /us$/) {sub("us", "", v)} else if (v ~ /s$/) {sub("s", "", v); v *= 1000000}; print v + 0}'; }

# One row: name, database (or -), then one "port:pid" per replica.
row() {
  local name=$1 db=$2; shift 2
  local ports=() gpids=()
  for r in "$@"; do ports+=("${r%%:*}"); gpids+=("${r#*:}"); done
  wrk_lua "$body" "$key"
  local pgp; pgp=$(pg_pids | tr '\n' ' ')
  local t0 g0 x0; t0=$(cpu_ticks "${gpids[@]}"); g0=$(cpu_ticks $pgp); x0=$(xacts "$db")
  # 32 connections in all, spread evenly over the replicas.
  local per=$(( 32 / ${#ports[@]} )) outs=()
  for p in "${ports[@]}"; do
    wrk -t1 -c"$per" -d"${SECONDS_PER_RUN}s" -s "$dir/post.lua" "http://127.0.0.1:$p/v1/chat/completions" >"$dir/wrk-$p.out" &
    outs+=("$!")
  done
  wait "${outs[@]}"
  local t1 g1 x1; t1=$(cpu_ticks "${gpids[@]}"); g1=$(cpu_ticks $pgp); x1=$(xacts "$db")
  local reqs=0 rps=0
  for p in "${ports[@]}"; do
    reqs=$(( reqs + $(awk '/requests in/ {print $1}' "$dir/wrk-$p.out") ))
    rps=$(awk -v a="$rps" -v b="$(awk '/Requests\/sec/ {print $2}' "$dir/wrk-$p.out")" 'BEGIN {printf "%.0f", a + b}')
  done
  local cpu_us=$(( (t1 - t0) * 10000 / (reqs > 0 ? reqs : 1) ))
  local pg_us=-; [ "$db" != - ] && pg_us=$(( (g1 - g0) * 10000 / (reqs > 0 ? reqs : 1) ))
  local trips=-; [ "$db" != - ] && trips=$(awk -v x="$(( x1 - x0 ))" -v n="$reqs" 'BEGIN {printf "%.3f", x / n}')
  # One call at a time (on the first replica).
  local one; one=$(wrk -t1 -c1 -d5s --latency -s "$dir/post.lua" "http://127.0.0.1:${ports[0]}/v1/chat/completions" | awk '/^ +50%/ {print $2}' | us)
  # 1,000 calls/s, spread evenly; every call's latency pooled.
  local rate=$(( 1000 / ${#ports[@]} )) loads=()
  x0=$(xacts "$db")
  for p in "${ports[@]}"; do
    LOAD_DUMP="$dir/fixed-$p.txt" "$load" "http://127.0.0.1:$p/v1/chat/completions" "$key" "$body" "$rate" "$SECONDS_PER_RUN" >/dev/null &
    loads+=("$!")
  done
  wait "${loads[@]}"
  x1=$(xacts "$db")
  local fixed_trips=-; [ "$db" != - ] && fixed_trips=$(awk -v x="$(( x1 - x0 ))" -v n="$(( 1000 * SECONDS_PER_RUN ))" 'BEGIN {printf "%.3f", x / n}')
  local p50p99; p50p99=$(python3 - "$dir" "${ports[@]}" <<'PY'
import sys
d, ports = sys.argv[1], sys.argv[2:]
lat = sorted(int(l.split()[1]) for p in ports for l in open(f"{d}/fixed-{p}.txt"))
print(lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))])
PY
)
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$name" "$rps" "$one" ${p50p99} "$cpu_us" "$pg_us" "$trips" "$fixed_trips"
}

echo "| target | calls/s at 32 connections | p50 µs one call at a time | p50 µs at 1,000/s | p99 µs at 1,000/s | gateway CPU µs per call | PostgreSQL CPU µs per call | PostgreSQL round trips per call, 32 connections | round trips per call, 1,000/s |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for kind in json sse; do
  body=$repo/benches/fixtures/request.json; key=$KEY_JSON
  [ "$kind" = sse ] && body=$repo/benches/fixtures/request-stream.json && key=$KEY_SSE
  row "SQLite, one gateway ($kind)" - "$P_SQLITE:$pid_sqlite"
  row "PostgreSQL, one replica ($kind)" single "$P_PG:$pid_pg"
  row "PostgreSQL, one replica, synchronous_commit off ($kind)" quick "$P_QUICK:$pid_quick"
  row "PostgreSQL, two replicas ($kind)" pair "$P_A:$pid_a" "$P_B:$pid_b"
done
# Direct to the upstream, for the latency floor.
body=$repo/benches/fixtures/request.json; key=$KEY_JSON
wrk_lua "$body" "$key"
echo
echo "direct to upstream (json), p50 one call at a time: $(wrk -t1 -c1 -d5s --latency -s "$dir/post.lua" "http://127.0.0.1:$UP_JSON/v1/chat/completions" | awk '/^ +50%/ {print $2}' | us) µs"
