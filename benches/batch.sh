#!/usr/bin/env bash
# Batches: lines per second through the gateway's batch runner against the
# simulated upstream, and the gateway's peak memory with a 50,000-line input
# file against a 5,000-line one (it must not grow with the file). Baseline,
# in the same run: the same lines sent as live calls, CONCURRENCY at a time
# (the batch's batch_concurrency), by a Python client on keep-alive
# connections. Release build; the SDK venv of scripts/test. Method and
# results: docs/benchmarks.md. Run: benches/batch.sh [LINES] (default 50000).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LINES=${1:-50000}
SMALL=$((LINES / 10))
CONCURRENCY=${CONCURRENCY:-8}
python=target/sdk/venv/bin/python
[ -x "$python" ] || { echo "run scripts/test first (it installs the SDK venv)" >&2; exit 1; }
cargo build --release --locked --bin tokenwarden >/dev/null 2>&1
bin=target/release/tokenwarden
dir=$(mktemp -d /tmp/tokenwarden-batch.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SIM=$(free_port)
"$bin" simulate --listen "127.0.0.1:$SIM" >/dev/null 2>&1 &
pids+=($!)
KEY=tw-bench-batch-key-0000001
run_gateway() { # name -> the base URL in $base, the gateway's pid in $gw
  local port; port=$(free_port)
  mkdir -p "$dir/$1"
  cat > "$dir/$1/tokenwarden.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[store]
url = "sqlite://$dir/$1/ledger.db"
[upstreams.sim]
base_url = "http://127.0.0.1:$SIM/v1"
api_key = "sk-bench"
[[orgs]]
name = "bench"
[[orgs.projects]]
name = "batch"
batch_concurrency = $CONCURRENCY
keys = ["$KEY"]
[program.groups.mini]
daily_tokens = 1000000000000
TOML
  "$bin" serve --config "$dir/$1/tokenwarden.toml" >"$dir/$1/out" 2>/dev/null &
  gw=$!
  pids+=("$gw")
  for _ in $(seq 100); do grep -q listening "$dir/$1/out" 2>/dev/null && break; sleep 0.1; done
  base="http://127.0.0.1:$port/v1"
}
peak_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }

cat > "$dir/bench.py" <<'PY'
import io, json, sys, time, concurrent.futures, httpx2 as httpx, openai
mode, base, key, n, conc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
body = {"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "Say something short."}]}
if mode == "batch":
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
    text = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n" for i in range(n))
    f = client.files.create(file=("in.jsonl", io.BytesIO(text.encode())), purpose="batch")
    start = time.time()
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.2)
        b = client.batches.retrieve(b.id)
    took = time.time() - start
    assert b.status == "completed" and b.request_counts.completed == n, b
else:
    http = httpx.Client(base_url=base, headers={"authorization": f"Bearer {key}"}, limits=httpx.Limits(max_connections=conc), timeout=60)
    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(conc) as pool:
        codes = list(pool.map(lambda _: http.post("/chat/completions", json=body).status_code, range(n)))
    took = time.time() - start
    assert all(c == 200 for c in codes)
print(f"{n / took:.0f} {took:.1f}")
PY

echo "| run | lines | lines/s | seconds | gateway peak RSS (MiB) |"
echo "|---|---:|---:|---:|---:|"
for run in "live:$LINES" "batch:$SMALL" "batch:$LINES"; do
  mode=${run%%:*}; n=${run##*:}
  run_gateway "$mode-$n"
  read -r rate took < <("$python" "$dir/bench.py" "$mode" "$base" "$KEY" "$n" "$CONCURRENCY")
  echo "| $mode | $n | $rate | $took | $(( $(peak_kib "$gw") / 1024 )) |"
  kill "$gw"; wait "$gw" 2>/dev/null || true
done
