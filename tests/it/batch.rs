//! OpenAI's Files and Batch APIs, run by tokenwarden.

use std::process::Command;

use crate::harness::start;

const WEB_KEY: &str = "tw-batch-web-key-00000001";
const LAB_KEY: &str = "tw-batch-lab-key-00000001";

fn config() -> String {
    format!(
        "[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"web\"\nkeys = [\"{WEB_KEY}\"]\n\n[[orgs.projects]]\nname = \"lab\"\nkeys = [\"{LAB_KEY}\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_uploads_lists_reads_and_deletes_files() {
    let h = start("batch-files", &config()).await;
    let stdout = crate::harness::python("python_files.py", &[&h.base, WEB_KEY, LAB_KEY]).await;
    assert!(stdout.contains("python files sdk ok"), "{stdout}");
    assert_eq!(h.served().requests, 0, "no file went upstream");
    // What is left in the ledger: the second file only, in one part.
    let files = h
        .gateway
        .store
        .files("acme".into(), "web".into())
        .await
        .unwrap_or_default();
    assert_eq!(files.len(), 1);
    let parts = h
        .gateway
        .store
        .file_parts("acme".into(), files[0].id.clone(), 0, 100)
        .await
        .unwrap_or_default();
    assert_eq!(
        parts.iter().map(bytes::Bytes::len).sum::<usize>() as u64,
        files[0].bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_runs_a_batch_to_completed() {
    let h = start("batch-run", &config()).await;
    let stdout =
        crate::harness::python("python_batch.py", &[&h.base, WEB_KEY, LAB_KEY, "40"]).await;
    assert!(stdout.contains("python batch sdk ok"), "{stdout}");
    let batch = stdout.lines().last().unwrap_or_default().to_owned();
    // Each line was a call on the metered road, recorded with the batch's id.
    h.settled().await;
    let records = h.gateway.store.recent(200).await.unwrap_or_default();
    let of_batch: Vec<_> = records.iter().filter(|r| *r.key_id == *batch).collect();
    assert_eq!(of_batch.len(), 40, "{batch}: {records:?}");
    assert!(of_batch.iter().all(|r| r.state == "settled" && r.free));
    assert_eq!(h.served().requests, 40);
    // The usage API tells batch calls from live ones (group_by=batch).
    let live = h
        .post("/chat/completions", WEB_KEY)
        .json(&serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16());
    assert_eq!(live, 200);
    h.settled().await;
    let start = h.today().start_unix() * 1000;
    let rows = h
        .gateway
        .store
        .usage_rows(start, start + 86_400_000, 86_400_000, &["batch"])
        .await
        .unwrap_or_default();
    let requests = |batch: &str| {
        rows.iter()
            .filter(|r| r.batch.as_deref() == Some(batch))
            .map(|r| r.num_model_requests)
            .sum::<u64>()
    };
    assert_eq!((requests("true"), requests("false")), (40, 1), "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_sdk_runs_a_batch_of_embeddings_to_completed() {
    let h = start("batch-node", &config()).await;
    let stdout = crate::harness::node("batch.mjs", &[&h.base, WEB_KEY, LAB_KEY, "25"]).await;
    assert!(stdout.contains("node batch sdk ok"), "{stdout}");
    assert!(h.served().requests >= 25, "the lines went upstream");
}

/// Put a batch input file of `lines` chat lines in the ledger, as an upload
/// of project `web` would.
async fn input_file(h: &crate::harness::Harness, lines: usize) -> String {
    input_file_of(h, "web", lines).await
}

/// Put a batch input file of `lines` chat lines in the ledger, as an upload
/// of `project` would.
async fn input_file_of(h: &crate::harness::Harness, project: &str, lines: usize) -> String {
    let text: String = (0..lines)
        .map(|i| {
            serde_json::json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}})
            .to_string()
                + "\n"
        })
        .collect();
    let meta = tokenwarden::store::FileMeta {
        id: format!("file-test-{project}"),
        org: "acme".into(),
        project: project.into(),
        purpose: String::new(),
        filename: "input.jsonl".into(),
        bytes: 0,
        created_at: 1,
    };
    let store = &h.gateway.store;
    let fail = |e: tokenwarden::store::StoreError| panic!("{e}");
    store.file_begin(meta.clone()).await.unwrap_or_else(fail);
    store
        .file_part(
            "acme".into(),
            meta.id.clone(),
            0,
            bytes::Bytes::from(text.clone()),
        )
        .await
        .unwrap_or_else(fail);
    store
        .file_end(
            "acme".into(),
            meta.id.clone(),
            "batch".into(),
            text.len() as u64,
        )
        .await
        .unwrap_or_else(fail);
    meta.id
}

async fn batch_status(h: &crate::harness::Harness, id: &str) -> serde_json::Value {
    batch_status_as(h, WEB_KEY, id).await
}

async fn batch_status_as(h: &crate::harness::Harness, key: &str, id: &str) -> serde_json::Value {
    h.client
        .get(format!("{}/batches/{id}", h.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default()
}

/// Under `batch_spend = "free"` a batch larger than the day's allowance
/// stops short of it (the reserve left to live calls) with nothing billed,
/// and goes on when the day rolls over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_only_batch_stops_at_the_cap_and_goes_on_the_next_day() {
    let config = format!("{}\n[program.groups.mini]\ndaily_tokens = 1000\n", config());
    const ADMIN: &str = "tw-batch-admin-token-0001";
    let h = crate::harness::start_with_server(
        "batch-free-only",
        &config,
        &format!("admin_token = \"{ADMIN}\"\n"),
    )
    .await;
    let root = h.base.trim_end_matches("/v1").to_owned();
    let file = input_file(&h, 140).await;
    let created: serde_json::Value = h
        .post("/batches", WEB_KEY)
        .json(&serde_json::json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "7d"}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    let id = created["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(created["status"], "in_progress", "{created}");
    // Wait until the runner stops: lines still pending, none running.
    let counts = || async {
        let c = h
            .gateway
            .store
            .batch_counts("acme".into(), id.clone())
            .await
            .unwrap_or_default();
        let n = |s: &str| c.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
        (n("pending"), n("running"), n("done"))
    };
    let mut last = (0, 0, 0);
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = counts().await;
        if now.1 == 0 && now.0 > 0 && now == last {
            break;
        }
        last = now;
    }
    let (pending, running, done) = counts().await;
    assert!(
        pending > 0 && running == 0 && done > 0,
        "{:?}",
        (pending, running, done)
    );
    h.settled().await;
    let day = h
        .daily("acme", "mini")
        .await
        .unwrap_or_else(|| panic!("no daily row"));
    assert_eq!(day.billed_tokens, 0, "nothing billed");
    assert!(
        day.free_tokens <= 900,
        "the 10% reserve stays for live calls: {}",
        day.free_tokens
    );
    assert_eq!(batch_status(&h, &id).await["status"], "in_progress");
    // The dashboard shows it waiting, with what it has done.
    let page = crate::harness::dashboard_page(&root, ADMIN).await;
    let row = format!("data-batch=\"{id}\" data-done=\"{done}\" data-total=\"140\"");
    assert!(page.contains(&row), "no {row} in the page");
    assert!(
        page.contains("in_progress") && page.contains("days at today&#39;s allowance"),
        "no estimate"
    );
    // The next day: it goes on to the end, still free.
    h.clock.set(crate::harness::NOON_MS + 86_400_000);
    let mut status = serde_json::Value::Null;
    for _ in 0..200 {
        status = batch_status(&h, &id).await;
        if status["status"] == "completed" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["request_counts"]["completed"], 140, "{status}");
    h.settled().await;
    let next = h
        .daily("acme", "mini")
        .await
        .unwrap_or_else(|| panic!("no daily row"));
    assert_eq!(next.billed_tokens, 0, "nothing billed the next day either");
}

/// `kill -9` while a batch runs, then a restart: every line is in the
/// output or error file exactly once, and none went upstream twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_and_restart_every_line_exactly_once() {
    use std::process::Stdio;
    let dir = crate::harness::temp_dir("batch-kill");
    let sim = tokenwarden::simulator::Simulator::new(
        crate::catalog(),
        tokenwarden::simulator::SimConfig {
            ttft: std::time::Duration::from_millis(20),
            token_delay: std::time::Duration::from_millis(5),
            output_tokens: 8,
        },
    );
    let (sim_addr, _sim_stop) =
        crate::harness::spawn(tokenwarden::simulator::router(sim.clone())).await;
    let file = dir.join("tokenwarden.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nurl = \"sqlite://{}\"\n\n[upstreams.sim]\nbase_url = \"http://{sim_addr}/v1\"\napi_key = \"${{UPSTREAM_KEY}}\"\n\n{}",
            dir.join("ledger.db").display(),
            config()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let serve = || {
        crate::harness::serve_process(
            Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
                .args(["serve", "--config"])
                .arg(&file)
                .env("UPSTREAM_KEY", crate::harness::UPSTREAM_KEY)
                .stderr(Stdio::null()),
        )
    };
    let (mut gateway, base) = serve();
    let lines = 200;
    let started = crate::harness::python(
        "python_batch_start.py",
        &[&base, WEB_KEY, &lines.to_string()],
    )
    .await;
    let id = started.trim().to_owned();
    // Kill it once some lines have run and the rest have not.
    let served = |sim: &std::sync::Arc<tokenwarden::simulator::Simulator>| {
        sim.stats()
            .get(crate::harness::UPSTREAM_KEY)
            .map_or(0, |s| s.requests)
    };
    for _ in 0..400 {
        if served(&sim) >= 30 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    gateway.kill().unwrap_or_else(|e| panic!("kill -9: {e}"));
    let _ = gateway.wait();
    let at_kill = served(&sim);
    assert!(
        at_kill >= 30 && at_kill < lines,
        "{at_kill} served when killed"
    );

    let (mut gateway, base) = serve();
    let client = crate::harness::http_client();
    let get = |path: String| {
        let client = client.clone();
        async move {
            client
                .get(path)
                .bearer_auth(WEB_KEY)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    let mut batch = serde_json::Value::Null;
    for _ in 0..600 {
        batch = get(format!("{base}/batches/{id}"))
            .await
            .json()
            .await
            .unwrap_or_default();
        if batch["status"] == "completed" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(batch["status"], "completed", "{batch}");
    let mut seen = std::collections::HashMap::new();
    for key in ["output_file_id", "error_file_id"] {
        let Some(file_id) = batch[key].as_str() else {
            continue;
        };
        let text = get(format!("{base}/files/{file_id}/content"))
            .await
            .text()
            .await
            .unwrap_or_default();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            *seen
                .entry(v["custom_id"].as_str().unwrap_or_default().to_owned())
                .or_insert(0) += 1;
        }
    }
    assert_eq!(seen.len(), lines as usize, "every line is in a file");
    assert!(seen.values().all(|n| *n == 1), "each exactly once");
    assert!(
        served(&sim) <= lines,
        "no line went upstream twice: {}",
        served(&sim)
    );
    assert_eq!(
        batch["request_counts"]["completed"].as_u64().unwrap_or(0)
            + batch["request_counts"]["failed"].as_u64().unwrap_or(0),
        lines
    );
    let _ = gateway.kill();
    let _ = gateway.wait();
}

/// A project whose `forward` rules open `/files` (or `/batches`) upstream
/// keeps sending those calls there; the others' are the gateway's own.
#[tokio::test]
async fn files_go_upstream_where_the_project_forwards_them() {
    let config = format!(
        "{}\n[[orgs]]\nname = \"fwd\"\n\n[[orgs.projects]]\nname = \"open\"\nforward = [\"GET /files\", \"POST /batches\"]\nkeys = [\"tw-batch-forward-key-00001\"]\n",
        config()
    );
    let h = start("batch-files-forwarded", &config).await;
    let get = |key: &'static str| {
        h.client
            .get(format!("{}/files", h.base))
            .bearer_auth(key)
            .send()
    };
    let _ = get("tw-batch-forward-key-00001").await.map(|r| r.status());
    let forwarded = h
        .gateway
        .store
        .recent_forwarded(10)
        .await
        .unwrap_or_default();
    assert_eq!(forwarded.len(), 1, "{forwarded:?}");
    assert_eq!(forwarded[0].path, "/files");
    let _ = h
        .client
        .post(format!("{}/batches", h.base))
        .bearer_auth("tw-batch-forward-key-00001")
        .json(&serde_json::json!({"input_file_id": "file-abc", "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .await;
    let forwarded = h
        .gateway
        .store
        .recent_forwarded(10)
        .await
        .unwrap_or_default();
    assert_eq!(forwarded.len(), 2, "{forwarded:?}");
    assert!(forwarded.iter().any(|f| f.path == "/batches"));
    let own = get(WEB_KEY).await.map_or(0, |r| r.status().as_u16());
    assert_eq!(own, 200);
    assert_eq!(
        h.gateway
            .store
            .recent_forwarded(10)
            .await
            .unwrap_or_default()
            .len(),
        2
    );
}

/// An upload a stop cut (begun, never complete) is deleted, parts and all,
/// once it is older than any upload may take; a recent one is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_a_stop_cut_are_deleted_after_six_hours() {
    let h = start("batch-abandoned", &config()).await;
    let store = &h.gateway.store;
    fn fail<T>(e: tokenwarden::store::StoreError) -> T {
        panic!("{e}")
    }
    let now_s = crate::harness::NOON_MS / 1000;
    for (id, age_s) in [
        ("file-cut-long-ago", 6 * 3600 + 1),
        ("file-cut-just-now", 60),
    ] {
        let meta = tokenwarden::store::FileMeta {
            id: id.into(),
            org: "acme".into(),
            project: "web".into(),
            purpose: String::new(),
            filename: "input.jsonl".into(),
            bytes: 0,
            created_at: now_s - age_s,
        };
        store.file_begin(meta).await.unwrap_or_else(fail);
        store
            .file_part(
                "acme".into(),
                id.into(),
                0,
                bytes::Bytes::from_static(b"{}\n"),
            )
            .await
            .unwrap_or_else(fail);
    }
    let left = || async {
        store
            .files_abandoned(i64::MAX)
            .await
            .unwrap_or_else(fail)
            .into_iter()
            .map(|(_, id)| id)
            .collect::<Vec<_>>()
    };
    // The runner looks every minute.
    h.clock.set(crate::harness::NOON_MS + 61_000);
    h.gateway.batches.notify_one();
    for _ in 0..200 {
        if left().await.len() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(left().await, vec!["file-cut-just-now".to_owned()]);
    let parts = store
        .file_parts("acme".into(), "file-cut-long-ago".into(), 0, 4)
        .await
        .unwrap_or_else(fail);
    assert!(parts.is_empty(), "its parts are gone");
}

/// Two projects' batches on one upstream run at most the upstream's
/// `batch_concurrency` lines at once, though each project allows more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_runs_at_most_its_batch_concurrency_lines_at_once() {
    let config = config().replace("keys = [", "batch_concurrency = 6\nkeys = [");
    let slow = tokenwarden::simulator::SimConfig {
        ttft: std::time::Duration::from_millis(30),
        ..tokenwarden::simulator::SimConfig::default()
    };
    let h = crate::harness::start_upstream(
        "batch-upstream-turns",
        &config,
        slow,
        "",
        "batch_concurrency = 3\n",
    )
    .await;
    let web = input_file_of(&h, "web", 20).await;
    let lab = input_file_of(&h, "lab", 20).await;
    let mut ids = Vec::new();
    for (key, file) in [(WEB_KEY, web), (LAB_KEY, lab)] {
        let batch: serde_json::Value = h
            .post("/batches", key)
            .json(&serde_json::json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .json()
            .await
            .unwrap_or_default();
        ids.push((key, batch["id"].as_str().unwrap_or_default().to_owned()));
    }
    for (key, id) in &ids {
        let mut status = serde_json::Value::Null;
        for _ in 0..400 {
            status = batch_status_as(&h, key, id).await;
            if status["status"] == "completed" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert_eq!(status["request_counts"]["completed"], 20, "{status}");
    }
    assert_eq!(h.served().requests, 40);
    let peak = h.sim.peak_open();
    assert!((2..=3).contains(&peak), "{peak} lines at once");
}

/// A batch a stop cut while its input was being checked does not stay
/// `validating` for ever: it fails, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_cut_while_validating_fails() {
    let h = start("batch-cut-validating", &config()).await;
    let now_s = crate::harness::NOON_MS / 1000;
    let batch = tokenwarden::gateway::batches::Batch {
        id: "batch_cutwhilevalidating0001".into(),
        object: "batch".into(),
        endpoint: "/v1/chat/completions".into(),
        input_file_id: "file-gone".into(),
        completion_window: "24h".into(),
        status: "validating".into(),
        created_at: now_s - 2 * 3600,
        ..tokenwarden::gateway::batches::Batch::default()
    };
    h.gateway
        .store
        .batch_save(batch.row("acme", "web"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    h.clock.set(crate::harness::NOON_MS + 61_000);
    h.gateway.batches.notify_one();
    let mut status = serde_json::Value::Null;
    for _ in 0..200 {
        status = batch_status(&h, &batch.id).await;
        if status["status"] == "failed" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(
        status["errors"]["data"][0]["code"],
        "validation_interrupted"
    );
}
