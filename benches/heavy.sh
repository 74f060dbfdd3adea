#!/usr/bin/env bash
# Large bodies beside small calls (benches/heavy.py): the release build in
# front of its simulator, a sharing project with privacy_guard = "block",
# four 560 KB bodies of e-mail addresses at once while /healthz and a small
# chat call are timed. BEFORE=PATH runs a binary built from another commit
# the same way, first. Method and results: docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --locked --bin tokenwarden >/dev/null 2>&1
dir=$(mktemp -d /tmp/tokenwarden-heavy.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SIM=$(free_port)
target/release/tokenwarden simulate --listen "127.0.0.1:$SIM" >/dev/null 2>&1 &
pids+=("$!")
KEY=tw-heavy-guarded-000000001
run() { # label binary
  local port; port=$(free_port)
  mkdir -p "$dir/$1"
  cat > "$dir/$1/tokenwarden.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
max_body_bytes = 8388608
[store]
url = "sqlite://$dir/$1/ledger.db"
[upstreams.sim]
base_url = "http://127.0.0.1:$SIM/v1"
api_key = "sk-heavy"
[[orgs]]
name = "heavy"
[[orgs.projects]]
name = "guarded"
privacy_guard = "block"
keys = ["$KEY"]
TOML
  "$2" serve --config "$dir/$1/tokenwarden.toml" >"$dir/$1/out" 2>"$dir/$1/err" &
  local pid=$!; pids+=("$pid")
  for _ in $(seq 100); do grep -q listening "$dir/$1/out" 2>/dev/null && break; sleep 0.1; done
  echo "$1: $(python3 benches/heavy.py "http://127.0.0.1:$port" "$KEY" "${LARGE_CALLS:-4}" "${EMAILS:-80000}")"
  kill "$pid"
}
[ -n "${BEFORE:-}" ] && run before "$BEFORE"
run as-is target/release/tokenwarden
