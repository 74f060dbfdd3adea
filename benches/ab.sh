#!/usr/bin/env bash
# A/B of the hand-made parts of the call path against their plain versions:
# the JSON scan (src/gateway/scan.rs: an answer's or chunk's usage and model
# read without parsing the rest) against serde's full parse, and Repoll
# (src/gateway/repoll.rs: a server connection that wakes itself is polled
# again in place) against tokio's own scheduling. Three release binaries
# (as is; --features bench-plain-scan; --features bench-plain-repoll), each
# in front of the same nginx upstream answering from memory, measured two
# ways:
# - instructions a call (valgrind's callgrind: one run of A calls and one of
#   B calls, one call at a time; (B's total - A's) / (B - A), so start-up
#   and shut-down cancel out), a whole answer and a stream;
# - p50 and p99 at 1,000 calls/s (benches/load.rs) and the gateway's CPU a
#   call (/proc/PID/stat), the three taking turns, ROUNDS rounds of
#   SECONDS_EACH seconds each.
# Method and results: docs/benchmarks.md. Run: benches/ab.sh (as root it
# installs nginx from Debian); VARIANTS="as-is" BEFORE=PATH benches/ab.sh
# compares the build as is with a binary built from another commit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
ROUNDS=${ROUNDS:-5}
SECONDS_EACH=${SECONDS_EACH:-5}
CALLS_A=${CALLS_A:-300}
CALLS_B=${CALLS_B:-1300}

command -v nginx >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; }
dir=$(mktemp -d /tmp/tokenwarden-ab.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$dir/nginx.pid" ] && kill "$(cat "$dir/nginx.pid")" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

# VARIANTS: which builds (default all three); BEFORE=PATH adds a binary
# built elsewhere (an earlier commit, say) as the variant "before".
read -r -a variants <<<"${VARIANTS:-as-is plain-scan plain-repoll}"
for v in "${variants[@]}"; do
  features=()
  [ "$v" != as-is ] && features=(--features "bench-$v")
  cargo build --release --locked --bin tokenwarden "${features[@]}" >/dev/null 2>&1
  cp target/release/tokenwarden "$dir/tw-$v"
done
if [ -n "${BEFORE:-}" ]; then
  cp "$BEFORE" "$dir/tw-before"
  variants=(before "${variants[@]}")
fi
# Leave the default build in target/release.
cargo build --release --locked --bin tokenwarden >/dev/null 2>&1
cargo bench --locked --bench load --no-run >/dev/null 2>&1
load=$(ls -t target/release/deps/load-* | grep -v '\.d$' | head -n 1)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_JSON=$(free_port); UP_SSE=$(free_port)
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

KEY_JSON=tw-ab-json-000000000000001
KEY_SSE=tw-ab-sse-0000000000000001
config() { # variant port
  mkdir -p "$dir/$1"
  cat > "$dir/$1/tokenwarden.toml" <<TOML
[server]
listen = "127.0.0.1:$2"
[store]
url = "sqlite://$dir/$1/ledger.db"
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
}
wait_listening() { for _ in $(seq 600); do grep -q listening "$1" 2>/dev/null && return; sleep 0.1; done; echo "no gateway in $1" >&2; exit 1; }
body_of() { [ "$1" = json ] && echo benches/fixtures/request.json || echo benches/fixtures/request-stream.json; }
key_of() { [ "$1" = json ] && echo "$KEY_JSON" || echo "$KEY_SSE"; }

# Instructions a call: the whole process (the store's writer thread
# included) under callgrind, CALLS calls one at a time (100 a second).
instructions() { # variant kind calls -> total instructions
  local v=$1 kind=$2 calls=$3 port; port=$(free_port)
  rm -rf "$dir/$v"; config "$v" "$port"
  valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" \
    "$dir/tw-$v" serve --config "$dir/$v/tokenwarden.toml" >"$dir/cg.log" 2>"$dir/cg.err" &
  local pid=$!
  wait_listening "$dir/cg.log"
  "$load" "http://127.0.0.1:$port/v1/chat/completions" "$(key_of "$kind")" "$(body_of "$kind")" 100 \
    "$(awk -v n="$calls" 'BEGIN {print n / 100}')" >/dev/null
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  awk '/^summary:/ {print $2}' "$dir/cg.out"
}
echo "| instructions a call (callgrind, one at a time) | whole answer | stream |"
echo "|---|---:|---:|"
for v in "${variants[@]}"; do
  row="| $v |"
  for kind in json sse; do
    a=$(instructions "$v" "$kind" "$CALLS_A"); b=$(instructions "$v" "$kind" "$CALLS_B")
    row="$row $(( (b - a) / (CALLS_B - CALLS_A) )) |"
  done
  echo "$row"
done

# At 1,000 calls/s: the three gateways run side by side, and take turns.
declare -A port_of pid_of
for v in "${variants[@]}"; do
  port_of[$v]=$(free_port)
  rm -rf "${dir:?}/$v"; config "$v" "${port_of[$v]}"
  "$dir/tw-$v" serve --config "$dir/$v/tokenwarden.toml" >"$dir/$v/out" 2>"$dir/$v/err" &
  pid_of[$v]=$!; pids+=("$!")
  wait_listening "$dir/$v/out"
done
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
echo
echo "| at 1,000 calls/s, $ROUNDS rounds taking turns | kind | p50 µs, each round | p99 µs, each round | median p99 | CPU µs a call, median |"
echo "|---|---|---|---|---:|---:|"
for kind in json sse; do
  declare -A p50s=() p99s=() cpus=()
  for _ in $(seq "$ROUNDS"); do
    for v in "${variants[@]}"; do
      t0=$(cpu_ticks "${pid_of[$v]}")
      out=$("$load" "http://127.0.0.1:${port_of[$v]}/v1/chat/completions" "$(key_of "$kind")" "$(body_of "$kind")" 1000 "$SECONDS_EACH")
      t1=$(cpu_ticks "${pid_of[$v]}")
      read -r p50 p99 calls < <(python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(r['p50_us'], r['p99_us'], r['calls'] - r['errors'])" "$out")
      p50s[$v]="${p50s[$v]:-} $p50"; p99s[$v]="${p99s[$v]:-} $p99"
      cpus[$v]="${cpus[$v]:-} $(( (t1 - t0) * 10000 / (calls > 0 ? calls : 1) ))"
    done
  done
  median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
  for v in "${variants[@]}"; do
    echo "| $v | $kind |${p50s[$v]} |${p99s[$v]} | $(median <<<"${p99s[$v]}") | $(median <<<"${cpus[$v]}") |"
  done
done
