#!/usr/bin/env bash
# Export memory and speed: `tokenwarden export` over 10,000 and 1,000,000
# captured calls in one ledger, side by side, with the peak resident memory
# measured by GNU time (and reported by the export itself) and, as the
# baseline, SQLite reading the same rows with nothing else done
# (python3's sqlite3, each body fetched and dropped). Method and results:
# docs/benchmarks.md. Run: benches/export.sh [ROWS] (default 1000000).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROWS=${1:-1000000}

command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time; }
cargo build --release --locked --bin tokenwarden >/dev/null
dir=$(mktemp -d /tmp/tokenwarden-export.XXXXXX)
trap 'rm -rf "$dir"' EXIT

cat > "$dir/tokenwarden.toml" <<TOML
[store]
url = "sqlite://$dir/ledger.db"
[upstreams.main]
base_url = "http://127.0.0.1:9/v1"
[[orgs]]
name = "small"
capture = true
[[orgs.projects]]
name = "tenant"
[[orgs]]
name = "large"
capture = true
[[orgs.projects]]
name = "tenant"
TOML
# Opening the ledger once creates it at the current schema.
target/release/tokenwarden usage --config "$dir/tokenwarden.toml" >/dev/null

# Fill both orgs with a typical captured chat call (DEFLATE, as the gateway stores it).
python3 - "$dir/ledger.db" "$ROWS" <<'PY'
import json, sqlite3, sys, zlib
db, rows = sys.argv[1], int(sys.argv[2])
pair = {"request": {"model": "gpt-4o-mini", "messages": [
    {"role": "system", "content": "You are a helpful assistant for a travel company."},
    {"role": "user", "content": "Which documents do I need for a trip from Lisbon to Toronto?"}]},
  "response": {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant",
      "content": "You need a valid passport and an eTA; check your airline's rules before you fly."},
      "finish_reason": "stop"}]}}
c = zlib.compressobj(6, zlib.DEFLATED, -15)
body = c.compress(json.dumps(pair).encode()) + c.flush()
conn = sqlite3.connect(db)
for org, n in (("small", 10000), ("large", rows)):
    conn.execute("""WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
      INSERT INTO captures (started_ms, org, project, model, endpoint, streamed, input_tokens, output_tokens, body)
      SELECT 1795521600000 + i, ?, 'tenant', 'gpt-4o-mini', '/v1/chat/completions', 0, 40, 20, ? FROM n""", (n, org, body))
conn.commit()
print(f"ledger: {len(body)} bytes per captured call, compressed")
PY
ls -l "$dir/ledger.db" | awk '{printf "ledger file: %.0f MB\n", $5 / 1e6}'

echo "| run | rows | seconds | rows/s | peak RSS (GNU time) | export's own report |"
echo "|---|---:|---:|---:|---:|---|"
for org in small large; do
  /usr/bin/time -f "%e %M" -o "$dir/time" python3 -c '
import sqlite3, sys
n = 0
for (body,) in sqlite3.connect(sys.argv[1]).execute("SELECT body FROM captures WHERE org = ? ORDER BY started_ms, id", (sys.argv[2],)):
    n += 1
print(n)' "$dir/ledger.db" "$org" > "$dir/n"
  read -r secs kb < "$dir/time"
  printf '| baseline: SQLite reads the rows (python3) | %s | %s | %.0f | %.1f MB | - |\n' "$(cat "$dir/n")" "$secs" "$(python3 -c "print($(cat "$dir/n") / max($secs, 0.01))")" "$(python3 -c "print($kb / 1024)")"
  for format in chat raw; do
    /usr/bin/time -f "%e %M" -o "$dir/time" target/release/tokenwarden export --config "$dir/tokenwarden.toml" --org "$org" --format "$format" > "$dir/out.jsonl" 2> "$dir/err"
    read -r secs kb < "$dir/time"
    lines=$(wc -l < "$dir/out.jsonl")
    printf '| tokenwarden export --format %s | %s | %s | %.0f | %.1f MB | %s |\n' "$format" "$lines" "$secs" "$(python3 -c "print($lines / max($secs, 0.01))")" "$(python3 -c "print($kb / 1024)")" "$(tail -n 1 "$dir/err" | sed 's/^export: //')"
    if [ "$format" = chat ]; then
      target/release/tokenwarden check-finetune "$dir/out.jsonl" > "$dir/check" 2>&1 || true
      check_note="$org, chat: $(cat "$dir/check")"
    fi
  done
  echo "check-finetune on $check_note" >> "$dir/notes"
done
echo
cat "$dir/notes"
