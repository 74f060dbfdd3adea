//! `/metrics`: Prometheus' text format, checked by `promtool check metrics`
//! (Debian's prometheus package; `scripts/test` unpacks it into
//! target/tools), with values that match the ledger.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::json;

use crate::harness::{start_with_server, Harness};

const ADMIN: &str = "admin-token-metrics-00001";
const APP: &str = "tw-metrics-app-0000000001";
const STRICT: &str = "tw-metrics-strict-000001";

fn config() -> String {
    format!(
        "[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{APP}\"]\n\n[[orgs.projects]]\nname = \"strict\"\non_exhausted = \"block\"\nkeys = [\"{STRICT}\"]\n\n[program.groups.flagship]\ndaily_tokens = 1000\n"
    )
}

async fn call(h: &Harness, key: &str, model: &str, output: u64, stream: bool) -> u16 {
    let body = json!({"model": model, "max_tokens": output, "stream": stream,
        "messages": [{"role": "user", "content": "Hello!"}]});
    let r = h
        .post("/chat/completions", key)
        .header("x-sim-output-tokens", output.to_string())
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = r.status().as_u16();
    let _ = r.bytes().await;
    status
}

fn promtool() -> PathBuf {
    std::env::var_os("TOKENWARDEN_PROMTOOL").map_or_else(
        || crate::harness::repo("target/tools/promtool"),
        PathBuf::from,
    )
}

/// `name{labels} value` lines -> value, keyed by the line's series.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(series, value)| Some((series.to_owned(), value.parse().ok()?)))
        .collect()
}

/// The sum of every sample of `name` whose labels include all of `with`.
fn sum(samples: &HashMap<String, f64>, name: &str, with: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            series.split('{').next() == Some(name) && with.iter().all(|w| series.contains(w))
        })
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_match_the_ledger() {
    let h = start_with_server(
        "metrics",
        &config(),
        &format!("admin_token = \"{ADMIN}\"\n"),
    )
    .await;
    let mut ok = 0;
    for (key, model, output, stream) in [
        (APP, "gpt-4o-mini", 16, false),
        (APP, "gpt-4o-mini", 40, true),
        (APP, "gpt-4o", 600, false),
        (APP, "gpt-4o", 600, false), // past the cap of 1000: billed
    ] {
        assert_eq!(call(&h, key, model, output, stream).await, 200);
        ok += 1;
    }
    // Refused by block (429), and a bad request (400).
    assert_eq!(call(&h, STRICT, "gpt-4o", 600, false).await, 429);
    let bad = h
        .post("/chat/completions", APP)
        .json(&json!({"model": "gpt-4o"}))
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(bad.unwrap_or(0), 400);
    h.settled().await;

    let url = format!("{}/metrics", h.base.trim_end_matches("/v1"));
    let closed = h.client.get(&url).send().await.map(|r| r.status().as_u16());
    assert_eq!(closed.unwrap_or(0), 401, "metrics without the admin token");
    let r = h
        .client
        .get(&url)
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap_or_default();

    let tool = promtool();
    assert!(
        tool.exists(),
        "{} is missing: run scripts/test, which unpacks it from Debian's prometheus package",
        tool.display()
    );
    let mut child = Command::new(&tool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", tool.display()));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let s = samples(&text);
    let day = h.today();
    let totals = h
        .gateway
        .store
        .daily(day)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let acme = |f: fn(&tokenwarden::store::DailyTotal) -> u64| -> f64 {
        totals
            .iter()
            .filter(|t| t.org == "acme")
            .map(f)
            .sum::<u64>() as f64
    };
    assert!(acme(|t| t.billed_tokens) > 0.0, "nothing was billed");
    assert_eq!(
        sum(
            &s,
            "tokenwarden_tokens_total",
            &["org=\"acme\"", "lane=\"free\""]
        ),
        acme(|t| t.free_tokens)
    );
    assert_eq!(
        sum(&s, "tokenwarden_tokens_total", &["lane=\"billed\""]),
        acme(|t| t.billed_tokens)
    );
    let cost = sum(&s, "tokenwarden_cost_usd_total", &["org=\"acme\""]);
    assert!(
        (cost - acme(|t| t.cost_pico) / 1e12).abs() < 1e-12,
        "{cost}"
    );
    // Input, cached and output add up to the ledger's records.
    let records = h.gateway.store.recent(100).await.unwrap_or_default();
    let output: u64 = records.iter().map(|r| r.output).sum();
    assert_eq!(
        sum(&s, "tokenwarden_tokens_total", &["kind=\"output\""]),
        output as f64
    );
    for (status, n) in [("200", ok), ("429", 1), ("400", 1)] {
        assert_eq!(
            sum(
                &s,
                "tokenwarden_requests_total",
                &[&format!("status=\"{status}\"")]
            ),
            f64::from(n),
            "status {status}"
        );
    }
    let flagship = h
        .daily("acme", "flagship")
        .await
        .unwrap_or_else(|| panic!("no flagship"));
    let g = ["org=\"acme\"", "group=\"flagship\""];
    assert_eq!(
        sum(&s, "tokenwarden_free_tokens_used", &g),
        flagship.free_tokens as f64
    );
    assert_eq!(sum(&s, "tokenwarden_free_tokens_limit", &g), 1000.0);
    assert_eq!(
        sum(&s, "tokenwarden_free_tokens_left", &g),
        (1000 - flagship.free_tokens) as f64
    );
    assert_eq!(sum(&s, "tokenwarden_calls_in_flight", &[]), 0.0);
    // One observation per admitted call (the refused and the bad one never went upstream).
    assert_eq!(
        sum(&s, "tokenwarden_request_duration_seconds_count", &[]),
        f64::from(ok)
    );
    assert_eq!(
        sum(&s, "tokenwarden_overhead_seconds_count", &[]),
        f64::from(ok)
    );
    // Bounded labels: no key ids in any series.
    assert!(
        !text.contains("key_id") && !text.contains(APP),
        "a key label:\n{text}"
    );
}

#[tokio::test]
async fn public_metrics_need_no_token() {
    let h = start_with_server("metrics-public", &config(), "public_metrics = true\n").await;
    let url = format!("{}/metrics", h.base.trim_end_matches("/v1"));
    let r = h
        .client
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 200);
    let body = r.text().await.unwrap_or_default();
    assert!(body.contains("tokenwarden_free_tokens_left{org=\"acme\",group=\"mini\"} 10000000"));
}
