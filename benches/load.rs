//! A small open-loop load generator for the gateway benchmark
//! (benches/gateway.sh): sends POSTs at a fixed rate, reads every answer to
//! its end (streams included), and reports latency percentiles. Calls are
//! dispatched on schedule whatever earlier calls do (open loop), and each
//! latency runs from the moment its call is dispatched: tokio's timer ticks
//! every millisecond, so timing from the scheduled instant would add up to a
//! millisecond of the loader's own lag to every call.
//!
//! `cargo bench --bench load -- URL KEY BODY_FILE RATE SECONDS`; with
//! `LOAD_DUMP=FILE` it also writes every call's dispatch time and latency
//! (µs since the start, µs, 1 if it succeeded), a line each, in dispatch order.

use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [url, key, body, rate, seconds] = args.as_slice() else {
        return Err("usage: load URL KEY BODY_FILE RATE SECONDS".into());
    };
    let body = std::fs::read(body)?;
    let rate: f64 = rate.parse()?;
    let seconds: f64 = seconds.parse()?;
    tokenwarden::gateway::upstream::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let latencies = runtime.block_on(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(4096)
            .tcp_nodelay(true)
            .build()?;
        let body = bytes::Bytes::from(body);
        let start = Instant::now();
        let total = (rate * seconds) as u64;
        let results = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total as usize)));
        let mut tasks = Vec::with_capacity(total as usize);
        for i in 0..total {
            let scheduled = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(scheduled.into()).await;
            let (client, url, key, body, results) = (
                client.clone(),
                url.clone(),
                key.clone(),
                body.clone(),
                results.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let dispatched = Instant::now();
                let ok = match client
                    .post(&url)
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                };
                let micros = dispatched.elapsed().as_micros() as u64;
                let at = dispatched.duration_since(start).as_micros() as u64;
                if let Ok(mut results) = results.lock() {
                    results.push((at, micros, ok));
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
        let results = results.lock().map(|r| r.clone()).unwrap_or_default();
        Ok::<_, reqwest::Error>(results)
    })?;
    if let Some(path) = std::env::var_os("LOAD_DUMP") {
        let mut dispatched = latencies.clone();
        dispatched.sort_unstable();
        let mut lines = String::with_capacity(dispatched.len() * 16);
        for (at, micros, ok) in &dispatched {
            lines.push_str(&format!("{at} {micros} {}\n", u8::from(*ok)));
        }
        std::fs::write(path, lines)?;
    }
    let errors = latencies.iter().filter(|(_, _, ok)| !ok).count();
    let mut micros: Vec<u64> = latencies.iter().map(|(_, m, _)| *m).collect();
    micros.sort_unstable();
    let pct = |p: f64| {
        micros
            .get(((micros.len() as f64 * p) as usize).min(micros.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"calls\": {}, \"errors\": {errors}, \"p50_us\": {}, \"p90_us\": {}, \"p99_us\": {}, \"p999_us\": {}, \"max_us\": {}}}",
        micros.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        micros.last().copied().unwrap_or(0)
    );
    Ok(())
}
