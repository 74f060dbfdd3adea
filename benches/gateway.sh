#!/usr/bin/env bash
# The gateway benchmark: added latency, throughput, CPU per call and memory
# of tokenwarden (metering on: exact counting, SQLite ledger) against an
# upstream that answers from memory (nginx returning a recorded response or
# stream), side by side in one run with the upstream reached directly and
# through nginx proxy_pass (the floor for any gateway), and TensorZero's
# gateway when its wheel can be installed. Method and results:
# docs/benchmarks.md. Run: benches/gateway.sh (root: installs nginx, wrk).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx wrk
fi
cargo build --release --locked --bin tokenwarden >/dev/null
cargo bench --locked --bench load --no-run >/dev/null 2>&1
load=$(ls -t target/release/deps/load-* | grep -v '\.d$' | head -n 1)
cargo bench --locked --bench bare_proxy --no-run >/dev/null 2>&1
bare_proxy=$(ls -t target/release/deps/bare_proxy-* | grep -v '\.d$' | head -n 1)

# HALT_POLL_NS: on a KVM guest with the haltpoll cpuidle driver, how long
# an idle vCPU polls before it halts, for this run only (restored at exit).
# Unset, the machine is measured as it is. The project's VM boots with
# `haltpoll.guest_halt_poll_ns=0`: every wake-up of an idle vCPU is a halt
# exit and an interrupt through the host (docs/benchmarks.md).
halt_poll=/sys/module/haltpoll/parameters/guest_halt_poll_ns
halt_poll_was=
if [ -n "${HALT_POLL_NS:-}" ]; then
  halt_poll_was=$(cat "$halt_poll")
  echo "$HALT_POLL_NS" > "$halt_poll"
fi
echo "guest halt polling: $(cat "$halt_poll" 2>/dev/null || echo 'not a haltpoll guest') ns"

dir=$(mktemp -d /tmp/tokenwarden-bench.XXXXXX)
pids=()
cleanup() {
  [ -n "$halt_poll_was" ] && echo "$halt_poll_was" > "$halt_poll"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$dir/nginx.pid" ] && kill "$(cat "$dir/nginx.pid")" 2>/dev/null || true
  [ -f "$dir/nginx2.pid" ] && kill "$(cat "$dir/nginx2.pid")" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_JSON=$(free_port); UP_SSE=$(free_port); PROXY_JSON=$(free_port); PROXY_SSE=$(free_port); GW=$(free_port)
PROXY2_JSON=$(free_port); PROXY2_SSE=$(free_port)

# nginx: two upstreams answering from memory, and plain reverse proxies in
# front of them. One nginx config: its name, then its servers.
nginx_conf() {
  cat > "$dir/$1.conf" <<NGINX
worker_processes 1;
pid $dir/$1.pid;
error_log $dir/$1-error.log;
daemon on;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream json_up { server 127.0.0.1:$UP_JSON; keepalive 256; }
  upstream sse_up { server 127.0.0.1:$UP_SSE; keepalive 256; }
$2
}
NGINX
  nginx -c "$dir/$1.conf"
}
proxies() { # json port, sse port
  echo "  server { listen 127.0.0.1:$1; location / { proxy_pass http://json_up; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
  echo "  server { listen 127.0.0.1:$2; location / { proxy_pass http://sse_up; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; } }"
}
# Static files answer POST with 405; error_page turns that into the file (as a GET).
nginx_conf nginx "  server { listen 127.0.0.1:$UP_JSON; types { } default_type application/json;
           location / { root $repo/benches/fixtures; try_files /chat.json =404; error_page 405 =200 \$uri; } }
  server { listen 127.0.0.1:$UP_SSE; types { } default_type \"text/event-stream; charset=utf-8\";
           location / { root $repo/benches/fixtures; try_files /chat.sse =404; error_page 405 =200 \$uri; } }
$(proxies "$PROXY_JSON" "$PROXY_SSE")"
# The same reverse proxies in a process of their own. The ones above run in
# the upstream's own worker, so a call through them never wakes another
# process; a gateway (this one, TensorZero) is a process of its own and
# pays two more wake-ups a call, as these do.
nginx_conf nginx2 "$(proxies "$PROXY2_JSON" "$PROXY2_SSE")"

# Bare proxies on tokio (benches/bare_proxy.rs): with no HTTP library, and
# with hyper's server and hyper-util's client (tokenwarden's HTTP stack)
# doing nothing else. Between them is what the HTTP stack costs.
RAW_JSON=$(free_port); RAW_SSE=$(free_port); HYPER_JSON=$(free_port); HYPER_SSE=$(free_port)
for b in "raw $RAW_JSON $UP_JSON" "raw $RAW_SSE $UP_SSE" "hyper $HYPER_JSON $UP_JSON" "hyper $HYPER_SSE $UP_SSE"; do
  read -r mode port upstream <<<"$b"
  "$bare_proxy" "$mode" "127.0.0.1:$port" "127.0.0.1:$upstream" >/dev/null 2>&1 &
  pids+=("$!")
done

# The simulated upstream, streaming slowly: for holding 1,000 streams open.
SIM=$(free_port)
target/release/tokenwarden simulate --listen "127.0.0.1:$SIM" --token-ms 100 --output-tokens 200 >/dev/null 2>&1 &
pids+=("$!")

KEY_JSON=tw-bench-json-000000000001
KEY_SSE=tw-bench-sse-0000000000001
cat > "$dir/tokenwarden.toml" <<TOML
[server]
listen = "127.0.0.1:$GW"
[store]
url = "sqlite://$dir/ledger.db"
[upstreams.json]
base_url = "http://127.0.0.1:$UP_JSON/v1"
api_key = "sk-bench"
[upstreams.sse]
base_url = "http://127.0.0.1:$UP_SSE/v1"
api_key = "sk-bench"
[upstreams.slow]
base_url = "http://127.0.0.1:$SIM/v1"
api_key = "sk-bench"
[[orgs]]
name = "bench"
[[orgs.projects]]
name = "slow"
upstream = "slow"
keys = ["tw-bench-slow-000000000001"]
[[orgs.projects]]
name = "json"
upstream = "json"
keys = ["$KEY_JSON"]
forward = ["POST /passthrough"]
[[orgs.projects]]
name = "sse"
upstream = "sse"
keys = ["$KEY_SSE"]
forward = ["POST /passthrough"]
[program.groups.mini]
daily_tokens = 1000000000000
TOML
target/release/tokenwarden serve --config "$dir/tokenwarden.toml" >"$dir/gw.out" 2>"$dir/gw.err" &
gw_pid=$!; pids+=("$gw_pid")
for _ in $(seq 50); do grep -q listening "$dir/gw.out" 2>/dev/null && break; sleep 0.1; done

nginx_worker() { pgrep -P "$(cat "$dir/${1:-nginx}.pid")" | head -n 1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

wrk_lua() { # body file, key
  cat > "$dir/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $2"
local f = io.open("$1", "rb"); wrk.body = f:read("*a"); f:close()
LUA
}

# One row: target name, URL, body, key, pid whose CPU is the target's own (or "-").
row() {
  local name=$1 url=$2 body=$3 key=$4 pid=$5
  wrk_lua "$body" "$key"
  local t0=0; [ "$pid" != - ] && t0=$(cpu_ticks "$pid")
  local out; out=$(wrk -t1 -c32 -d"${SECONDS_PER_RUN}s" --latency -s "$dir/post.lua" "$url")
  local t1=0; [ "$pid" != - ] && t1=$(cpu_ticks "$pid")
  local rps; rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  local reqs; reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  local errors; errors=$(awk '/Non-2xx/ {print $4}' <<<"$out"); errors=${errors:-0}
  local cpu_us=-; [ "$pid" != - ] && cpu_us=$(( (t1 - t0) * 10000 * 1000 / (reqs > 0 ? reqs : 1) / 1000 ))
  local rss=-; [ "$pid" != - ] && rss=$(( $(rss_kb "$pid") / 1024 ))
  # The 32-connection run leaves tokenwarden's ledger writes for the kernel
  # to flush; flush them now, so that the runs below measure their own.
  sync
  local one; one=$(wrk -t1 -c1 -d5s --latency -s "$dir/post.lua" "$url" | awk '/^ +50%/ {print $2}')
  local fixed; fixed=$("$load" "$url" "$key" "$body" 1000 "$SECONDS_PER_RUN")
  local p50 p99; p50=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['p50_us'])" "$fixed"); p99=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['p99_us'])" "$fixed")
  printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$name" "$rps" "$one" "$p50" "$p99" "$cpu_us" "$rss" "$errors"
}

# TensorZero's gateway, embedded in its Python wheel, in front of the same upstreams.
tz_base=
tz_venv=target/bench/tz-venv
if [ -x "$tz_venv/bin/python" ] || { python3 -m venv "$tz_venv" && "$tz_venv/bin/pip" install --quiet tensorzero==2026.6.0; }; then
  cat > "$dir/tz.toml" <<TZ
[models."gpt-4o-mini"]
routing = ["up"]
[models."gpt-4o-mini".providers.up]
type = "openai"
api_base = "http://127.0.0.1:$UP_JSON/v1"
model_name = "gpt-4o-mini"
api_key_location = "none"
[models."sse"]
routing = ["up"]
[models."sse".providers.up]
type = "openai"
api_base = "http://127.0.0.1:$UP_SSE/v1"
model_name = "gpt-4o-mini"
api_key_location = "none"
[models."slow"]
routing = ["up"]
[models."slow".providers.up]
type = "openai"
api_base = "http://127.0.0.1:$SIM/v1"
model_name = "gpt-4o-mini"
api_key_location = "env::SIM_KEY"
TZ
  cat > "$dir/tz.py" <<'PY'
import sys, time, tensorzero
gw = tensorzero._start_http_gateway(config_file=sys.argv[1], clickhouse_url=None, postgres_url=None, valkey_url=None, async_setup=False)
print(gw.base_url if hasattr(gw, "base_url") else gw, flush=True)
time.sleep(100000)
PY
  SIM_KEY=sk-bench "$tz_venv/bin/python" "$dir/tz.py" "$dir/tz.toml" >"$dir/tz.out" 2>&1 &
  tz_pid=$!; pids+=("$tz_pid")
  for _ in $(seq 100); do tz_base=$(grep -m1 '^http' "$dir/tz.out" || true); [ -n "$tz_base" ] && break; sleep 0.1; done
  for m in gpt-4o-mini sse slow; do
    sed "s/\"gpt-4o-mini\"/\"tensorzero::model_name::$m\"/" benches/fixtures/request.json > "$dir/tz-$m.json"
    sed "s/\"gpt-4o-mini\"/\"tensorzero::model_name::$m\"/" benches/fixtures/request-stream.json > "$dir/tz-$m-stream.json"
  done
fi

# A kind's request body, key, upstream and proxies (json or sse).
kind_vars() {
  body=$repo/benches/fixtures/request.json; up=$UP_JSON; proxy=$PROXY_JSON; proxy2=$PROXY2_JSON; key=$KEY_JSON
  raw=$RAW_JSON; hyper=$HYPER_JSON
  if [ "$1" = sse ]; then
    body=$repo/benches/fixtures/request-stream.json; up=$UP_SSE; proxy=$PROXY_SSE; proxy2=$PROXY2_SSE; key=$KEY_SSE
    raw=$RAW_SSE; hyper=$HYPER_SSE
  fi
}

echo "| target | calls/s at 32 connections | p50 one call at a time | p50 µs at 1,000/s | p99 µs at 1,000/s | CPU µs per call | RSS MB | non-2xx |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for kind in json sse; do
  kind_vars "$kind"
  row "direct to upstream ($kind)" "http://127.0.0.1:$up/v1/chat/completions" "$body" "$key" -
  row "nginx proxy_pass ($kind)" "http://127.0.0.1:$proxy/v1/chat/completions" "$body" "$key" "$(nginx_worker)"
  row "nginx proxy_pass, own process ($kind)" "http://127.0.0.1:$proxy2/v1/chat/completions" "$body" "$key" "$(nginx_worker nginx2)"
  row "tokenwarden ($kind)" "http://127.0.0.1:$GW/v1/chat/completions" "$body" "$key" "$gw_pid"
  if [ -n "$tz_base" ]; then
    tz_body=$dir/tz-gpt-4o-mini.json; [ "$kind" = sse ] && tz_body=$dir/tz-sse-stream.json
    row "TensorZero 2026.6.0 ($kind)" "$tz_base/chat/completions" "$tz_body" none "$tz_pid"
  else
    echo "| TensorZero ($kind) | not run: the wheel could not be installed or started | | | | | | |"
  fi
done

# Added latency one call at a time, interleaved: direct, the own-process
# proxy and tokenwarden take turns (2 s of `wrk -c1` each, ONE_ROUNDS rounds),
# so that the machine's drift between runs falls out of each round's
# difference; the table gives every round's difference and their median.
ONE_ROUNDS=${ONE_ROUNDS:-5}
one_p50() { # url -> p50 in µs
  wrk -t1 -c1 -d2s --latency -s "$dir/post.lua" "$1" |
    awk '/^ +50%/ {v = $2; if (v ~ /ms$/) {sub("ms", "", v); v *= 1000} else {sub("us", "", v)}; print v + 0}'
}
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
echo
echo "| added one call at a time, interleaved | tokenwarden - direct, each round (µs) | median | nginx own process - direct, each round | median |"
echo "|---|---|---:|---|---:|"
for kind in json sse; do
  kind_vars "$kind"
  wrk_lua "$body" "$key"
  tw_added=; ng_added=
  for _ in $(seq "$ONE_ROUNDS"); do
    d=$(one_p50 "http://127.0.0.1:$up/v1/chat/completions")
    n=$(one_p50 "http://127.0.0.1:$proxy2/v1/chat/completions")
    t=$(one_p50 "http://127.0.0.1:$GW/v1/chat/completions")
    tw_added="$tw_added $(awk -v a="$t" -v b="$d" 'BEGIN {print a - b}')"
    ng_added="$ng_added $(awk -v a="$n" -v b="$d" 'BEGIN {print a - b}')"
  done
  printf '| %s |%s | %s |%s | %s |\n' "$kind" "$tw_added" "$(median <<<"$tw_added")" "$ng_added" "$(median <<<"$ng_added")"
done

# p99 at a fixed 1,000 calls/s, interleaved: direct, the own-process proxy,
# tokenwarden, tokenwarden's unmetered path (any other /v1 path: the same
# server, key check and upstream client, logged, without the meter, the
# ledger or the tap) and the two bare proxies take turns (FIXED_SECONDS
# each, FIXED_ROUNDS rounds), so that a noisy spell of the machine falls on
# all of them; the table gives
# every round's p99, their median, and the p99 of all the rounds' calls
# together (LOAD_DUMP keeps each call's latency).
FIXED_ROUNDS=${FIXED_ROUNDS:-5}
FIXED_SECONDS=${FIXED_SECONDS:-4}
echo
echo "| p99 µs at 1,000/s, interleaved | target | each round | median | all rounds' calls |"
echo "|---|---|---|---:|---:|"
for kind in json sse; do
  kind_vars "$kind"
  for r in $(seq "$FIXED_ROUNDS"); do
    for t in "direct:$up/v1/chat/completions" "nginx:$proxy2/v1/chat/completions" \
      "tokenwarden:$GW/v1/chat/completions" "passthrough:$GW/v1/passthrough/chat/completions" \
      "raw:$raw/v1/chat/completions" "hyper:$hyper/v1/chat/completions"; do
      LOAD_DUMP="$dir/fixed-$kind-${t%%:*}-$r.txt" "$load" "http://127.0.0.1:${t#*:}" \
        "$key" "$body" 1000 "$FIXED_SECONDS" >/dev/null
    done
  done
  python3 - "$dir" "$kind" "$FIXED_ROUNDS" <<'PY'
import statistics, sys
d, kind, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))]
for t, name in [("direct", "direct to upstream"), ("nginx", "nginx proxy_pass, own process"), ("tokenwarden", "tokenwarden"),
                ("passthrough", "tokenwarden, unmetered path"),
                ("raw", "bare proxy on tokio, no HTTP library"), ("hyper", "bare proxy on hyper and hyper-util")]:
    each, pooled = [], []
    for r in range(1, rounds + 1):
        with open(f"{d}/fixed-{kind}-{t}-{r}.txt") as f:
            lat = [int(line.split()[1]) for line in f]
        each.append(p99(lat))
        pooled += lat
    print(f"| {kind} | {name} | {' '.join(map(str, each))} | {statistics.median(each):g} | {p99(pooled)} |")
PY
done

# Memory with 1,000 streams open at once (upstream: the simulator, 100 ms a token).
ulimit -n 65536 2>/dev/null || true
hold() { # name, port, path, key, body, pid
  python3 benches/open_streams.py 127.0.0.1 "$2" "$3" "$4" "$5" 1000 6 >"$dir/hold.out" 2>&1 &
  local holder=$!
  for _ in $(seq 300); do grep -q '^open' "$dir/hold.out" && break; sleep 0.1; done
  printf '| %s | %s | %s MB |\n' "$1" "$(cat "$dir/hold.out" | head -n 1)" "$(( $(rss_kb "$6") / 1024 ))"
  wait "$holder" || true
}
echo
echo "| target | streams | RSS with 1,000 streams open |"
echo "|---|---|---:|"
hold tokenwarden "$GW" /v1/chat/completions tw-bench-slow-000000000001 benches/fixtures/request-stream.json "$gw_pid"
if [ -n "$tz_base" ]; then
  tz_port=$(sed -E 's#http://127.0.0.1:([0-9]+).*#\1#' <<<"$tz_base")
  hold "TensorZero 2026.6.0" "$tz_port" /openai/v1/chat/completions none "$dir/tz-slow-stream.json" "$tz_pid"
fi
sqlite3 "$dir/ledger.db" "select count(*), sum(input_tokens + output_tokens) from requests where state = 'settled'" 2>/dev/null | sed 's/^/ledger: calls|tokens = /' || true
