//! The organization's settings, projects and keys at runtime, through
//! OpenAI's Admin API shape: the official Python SDK's admin resources, and
//! raw HTTP where it has none (data sharing, project policies).

use std::process::Command;

use serde_json::{json, Value};

use crate::harness::{repo, start_with_server, Harness};

const PLATFORM: &str = "tw-admin-platform-token-01";
const ACME_ADMIN: &str = "tw-admin-acme-admin-key-01";
const BETA_ADMIN: &str = "tw-admin-beta-admin-key-01";
const WEB_KEY: &str = "tw-admin-web-key-00000001";
const LAB_KEY: &str = "tw-admin-lab-key-00000001";

async fn gateway(label: &str) -> Harness {
    let config = format!(
        "[[orgs]]\nname = \"acme\"\nsharing = \"all\"\ncapture = true\nadmin_keys = [\"{ACME_ADMIN}\"]\n\n[[orgs.projects]]\nname = \"web\"\nkeys = [\"{WEB_KEY}\"]\n\n[[orgs]]\nname = \"beta\"\nadmin_keys = [\"{BETA_ADMIN}\"]\n\n[[orgs.projects]]\nname = \"lab\"\nkeys = [\"{LAB_KEY}\"]\n"
    );
    start_with_server(label, &config, &format!("admin_token = \"{PLATFORM}\"\n")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_manages_projects_and_keys() {
    let h = gateway("admin-sdk").await;
    let stdout = crate::harness::python("python_admin.py", &[&h.base, ACME_ADMIN, PLATFORM]).await;
    assert!(stdout.contains("python admin sdk ok"), "{stdout}");
    // Every change is in the ledger, with who made it; beta saw none of them.
    let changes = h.gateway.changes_of(Some("acme")).await;
    assert!(changes.len() >= 9, "{changes:?}");
    assert!(changes.iter().any(|c| c.actor == "admin token"));
    assert!(changes.iter().any(|c| c.actor.starts_with("admin key ")));
    assert!(h.gateway.changes_of(Some("beta")).await.is_empty());
    // A restart on the same ledger runs on them: the archived project is
    // there, archived, and its keys still do not work.
    let again = h.restart().await;
    let live = again.live();
    let acme = &live.config.orgs[0];
    assert_eq!(acme.projects.len(), 2);
    assert!(
        acme.projects[1].archived_at.is_some() && acme.projects[1].name.as_ref() == "Research 2"
    );
}

/// `METHOD path` with a bearer token and an optional JSON body and org header.
async fn call(
    h: &Harness,
    method: &str,
    path: &str,
    token: &str,
    org: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let root = h.base.trim_end_matches("/v1");
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
    let mut request = h
        .client
        .request(method, format!("{root}{path}"))
        .bearer_auth(token);
    if let Some(org) = org {
        request = request.header("openai-organization", org);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let r = request.send().await.unwrap_or_else(|e| panic!("{e}"));
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

/// A call of project web: its free-token limit header (0: not free).
async fn free_limit(h: &Harness) -> u64 {
    let r = h
        .post("/chat/completions", WEB_KEY)
        .json(&json!({"model": "gpt-4o-mini", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 200);
    r.headers()
        .get("x-free-tokens-limit")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

#[tokio::test]
async fn data_sharing_and_policies_change_from_the_next_call() {
    let h = gateway("admin-sharing").await;
    let sharing = "/v1/organization/data_sharing";
    let (status, now) = call(&h, "GET", sharing, ACME_ADMIN, None, None).await;
    assert_eq!(status, 200, "{now}");
    assert_eq!(
        (
            now["sharing"].as_str(),
            now["history"].as_array().map(Vec::len)
        ),
        (Some("all"), Some(0))
    );
    assert_eq!(free_limit(&h).await, 10_000_000);
    let captured = h.gateway.store.count_captures("acme").await.unwrap_or(0);
    assert_eq!(captured, 1);

    // Opting out ends free tokens and capture for the next call.
    let (status, now) = call(
        &h,
        "POST",
        sharing,
        ACME_ADMIN,
        None,
        Some(json!({"sharing": "disabled"})),
    )
    .await;
    assert_eq!(status, 200, "{now}");
    assert_eq!(now["sharing"], "disabled");
    assert_eq!(free_limit(&h).await, 0);
    assert_eq!(
        h.gateway.store.count_captures("acme").await.unwrap_or(0),
        captured
    );

    // Selected projects, by id.
    let (status, now) = call(
        &h,
        "POST",
        sharing,
        ACME_ADMIN,
        None,
        Some(json!({"sharing": "selected", "project_ids": ["web"]})),
    )
    .await;
    assert_eq!(status, 200, "{now}");
    assert_eq!(now["project_ids"], json!(["web"]));
    assert_eq!(free_limit(&h).await, 10_000_000);
    let history = now["history"].as_array().cloned().unwrap_or_default();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["sharing"], "disabled");
    assert!(history[1]["changed_by"]
        .as_str()
        .is_some_and(|a| a.starts_with("admin key ")));
    assert!(history[1]["changed_at"].as_i64().is_some_and(|t| t > 0));

    // Bad requests are OpenAI's 400s, and change nothing.
    for body in [
        json!({"sharing": "sometimes"}),
        json!({"sharing": "selected", "project_ids": ["nope"]}),
        json!({"sharing": "all", "colour": "red"}),
        json!({"sharing": "all", "project_ids": ["web"]}),
        json!({}),
    ] {
        let (status, error) = call(&h, "POST", sharing, ACME_ADMIN, None, Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    }
    assert_eq!(h.gateway.changes_of(Some("acme")).await.len(), 2);

    // A project's policy: block once the allowance is spent.
    let (status, project) = call(
        &h,
        "POST",
        "/v1/organization/projects/web",
        ACME_ADMIN,
        None,
        Some(json!({"on_exhausted": "block", "privacy_guard": "block"})),
    )
    .await;
    assert_eq!(status, 200, "{project}");
    assert_eq!(
        (
            project["on_exhausted"].as_str(),
            project["privacy_guard"].as_str()
        ),
        (Some("block"), Some("block"))
    );
    let r = h
        .post("/chat/completions", WEB_KEY)
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "mail me: jane.doe@example.com"}]}))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16());
    assert_eq!(r, 400, "the privacy guard now blocks");
    let (status, _) = call(
        &h,
        "POST",
        "/v1/organization/projects/web",
        ACME_ADMIN,
        None,
        Some(json!({"on_exhausted": "pray"})),
    )
    .await;
    assert_eq!(status, 400);

    // The platform's token names its org; one org's key reaches no other.
    let (status, _) = call(&h, "GET", sharing, PLATFORM, None, None).await;
    assert_eq!(status, 400, "two orgs: the platform must name one");
    let (status, now) = call(&h, "GET", sharing, PLATFORM, Some("beta"), None).await;
    assert_eq!((status, now["organization"].as_str()), (200, Some("beta")));
    let (status, _) = call(&h, "GET", sharing, BETA_ADMIN, Some("acme"), None).await;
    assert_eq!(status, 403);
    let (status, _) = call(
        &h,
        "GET",
        "/v1/organization/projects/web",
        BETA_ADMIN,
        None,
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &h,
        "POST",
        "/v1/organization/projects/web/archive",
        BETA_ADMIN,
        None,
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, list) = call(
        &h,
        "GET",
        "/v1/organization/projects",
        BETA_ADMIN,
        None,
        None,
    )
    .await;
    assert_eq!(
        (status, list["data"].as_array().map(Vec::len)),
        (200, Some(1))
    );
    assert_eq!(list["data"][0]["id"], "lab");
    let (status, _) = call(
        &h,
        "POST",
        sharing,
        BETA_ADMIN,
        Some("acme"),
        Some(json!({"sharing": "disabled"})),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(free_limit(&h).await, 10_000_000, "acme still shares");
}

/// `check-config` says where what was changed at runtime differs from the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_names_what_changed_at_runtime() {
    let h = gateway("admin-check-config").await;
    let file = h.config_file();
    let check = || {
        let out = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
            .args(["check-config", "--config"])
            .arg(&file)
            .env("UPSTREAM_KEY", crate::harness::UPSTREAM_KEY)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!check().contains("changed at runtime"), "{}", check());
    let sharing = "/v1/organization/data_sharing";
    let (status, _) = call(
        &h,
        "POST",
        sharing,
        ACME_ADMIN,
        None,
        Some(json!({"sharing": "disabled"})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        &h,
        "POST",
        "/v1/organization/projects/web",
        ACME_ADMIN,
        None,
        Some(json!({"on_exhausted": "block"})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, made) = call(
        &h,
        "POST",
        "/v1/organization/projects",
        ACME_ADMIN,
        None,
        Some(json!({"name": "Research"})),
    )
    .await;
    assert_eq!(status, 200, "{made}");
    let id = made["id"].as_str().unwrap_or_default().to_owned();
    let text = check();
    for line in [
        "changed at runtime (3 changes in the ledger".to_owned(),
        "org acme: data sharing is disabled (the file says all)".to_owned(),
        "org acme project web: on_exhausted is block (the file says bill)".to_owned(),
        format!("org acme: project {id} (Research) was made at runtime"),
    ] {
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
    }
    assert!(!text.contains("org beta"), "{text}");
}

/// The dashboard's settings panel, in Chromium, with an org admin key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_settings_panel_changes_sharing_and_policy() {
    assert!(
        repo("tests/sdk/node/node_modules/playwright-core").exists(),
        "tests/sdk/node/node_modules is missing: run scripts/test, which installs playwright-core"
    );
    let h = gateway("admin-dashboard").await;
    let root = h.base.trim_end_matches("/v1").to_owned();
    let script = repo("tests/sdk/node/settings.mjs");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(&script)
            .args([&root, ACME_ADMIN])
            .output()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap_or_else(|e| panic!("node: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("\"phase\":\"done\""), "{stdout}");
    // The gateway runs on what the forms said, and kept who said it.
    let live = h.gateway.live();
    let acme = &live.config.orgs[0];
    assert_eq!(acme.sharing, tokenwarden::config::OrgSharing::Selected);
    assert!(acme.projects[0].shares && acme.projects[0].selected);
    assert_eq!(
        acme.projects[0].on_exhausted,
        tokenwarden::config::Policy::Block
    );
    let changes = h.gateway.changes_of(Some("acme")).await;
    assert_eq!(changes.len(), 2);
    assert!(changes
        .iter()
        .all(|c| c.actor.ends_with("(dashboard)") && c.actor.starts_with("admin key ")));
    assert!(h.gateway.changes_of(Some("beta")).await.is_empty());
}

/// A call admitted before an opt-out keeps its terms (free, captured); the
/// next one gets the new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_keeps_the_terms_it_was_admitted_under() {
    let config = format!(
        "[[orgs]]\nname = \"acme\"\ncapture = true\nadmin_keys = [\"{ACME_ADMIN}\"]\n\n[[orgs.projects]]\nname = \"web\"\nkeys = [\"{WEB_KEY}\"]\n"
    );
    let h = crate::harness::start_inner(
        "admin-in-flight",
        &config,
        tokenwarden::simulator::SimConfig {
            ttft: std::time::Duration::from_millis(5),
            token_delay: std::time::Duration::from_millis(20),
            output_tokens: 40,
        },
        &format!("admin_token = \"{PLATFORM}\"\n"),
    )
    .await;
    let stream = {
        let request = h
            .post("/chat/completions", WEB_KEY)
            .json(&json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "a long one"}]}));
        tokio::spawn(async move {
            let r = request.send().await.unwrap_or_else(|e| panic!("{e}"));
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let (status, _) = call(
        &h,
        "POST",
        "/v1/organization/data_sharing",
        ACME_ADMIN,
        None,
        Some(json!({"sharing": "disabled"})),
    )
    .await;
    assert_eq!(status, 200);
    let (code, text) = stream.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 200);
    assert!(text.trim_end().ends_with("data: [DONE]"));
    assert_eq!(free_limit(&h).await, 0, "the next call is not free");
    h.settled().await;
    let records = h.gateway.store.recent(2).await.unwrap_or_default();
    assert_eq!(records.len(), 2);
    let (next, streamed) = (&records[0], &records[1]);
    assert!(streamed.free && streamed.decision == "free", "{streamed:?}");
    assert!(!next.free, "{next:?}");
    assert_eq!(
        h.gateway.store.count_captures("acme").await.unwrap_or(0),
        1,
        "only the call in flight was captured"
    );
}
