//! A tenant stays inside its project: nothing but the metered routes and a
//! project's `forward` rules reaches the upstream with the gateway's key,
//! whatever method or spelling of a path it sends.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{dashboard_page, start, start_with_server, Harness, UPSTREAM_KEY};

const PLAIN: &str = "tw-test-isolation-plain-01";
const MODS: &str = "tw-test-isolation-mods-001";

/// Project `plain` forwards nothing (the default); project `mods` forwards
/// moderations and a model's own page.
fn config() -> String {
    format!(
        r#"
[[orgs]]
name = "acme"

[[orgs.projects]]
name = "plain"
keys = ["{PLAIN}"]

[[orgs.projects]]
name = "mods"
keys = ["{MODS}"]
forward = ["POST /moderations", "GET /models"]
"#
    )
}

/// The gateway's address (host:port) in a harness.
fn address(h: &Harness) -> String {
    h.base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_owned()
}

/// Send one raw HTTP/1.1 request (its path exactly as written: an HTTP
/// client library would normalize it) and return the status and body.
async fn raw(h: &Harness, method: &str, path: &str, key: &str, body: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(address(h))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer to {method} {path}");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn nothing_is_forwarded_that_the_project_does_not_allow() {
    let h = start("isolation-default", &config()).await;
    for (method, path) in [
        ("GET", "/v1/fine_tuning/jobs"),
        ("GET", "/v1/assistants"),
        ("GET", "/v1/vector_stores"),
        ("GET", "/v1/organization/users"),
        ("POST", "/v1/images/generations"),
        ("POST", "/v1/audio/speech"),
        ("POST", "/v1/moderations"),
        ("TRACE", "/v1/models"),
        ("TRACE", "/v1/files"),
        ("PUT", "/v1/files/file-abc123"),
        // A GET rule lets no HEAD through (/v1/models/{id} is the
        // gateway's own; a longer path is the rule's); an absolute-form
        // target is judged by its path; `*` is no path.
        ("HEAD", "/v1/models/gpt-4o/versions"),
        ("GET", "http://upstream.example/v1/vector_stores"),
        ("POST", "http://upstream.example/v1/moderations/../files"),
        ("OPTIONS", "*"),
    ] {
        for key in [PLAIN, MODS] {
            if key == MODS && (method, path) == ("POST", "/v1/moderations") {
                continue;
            }
            let (status, body) = raw(&h, method, path, key, "{}").await;
            let json: Value = serde_json::from_str(&body).unwrap_or_default();
            assert!(
                matches!(status, 404 | 405),
                "{method} {path} with {key}: {status} {body}"
            );
            if status == 404 && method != "HEAD" {
                assert_eq!(json["error"]["code"], "unknown_url", "{body}");
            }
        }
    }
    // The Files and Batch APIs are the gateway's own, never forwarded.
    let (status, body) = raw(&h, "GET", "/v1/batches", PLAIN, "").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = raw(&h, "POST", "/v1/batches", PLAIN, "{}").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = raw(&h, "GET", "/v1/files", PLAIN, "").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = raw(&h, "DELETE", "/v1/files/file-abc123", PLAIN, "").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("No such File object"), "{body}");
    // An admin route is no client's: 401, never forwarded.
    let (status, _) = raw(&h, "GET", "/v1/organization/admin_api_keys", PLAIN, "{}").await;
    assert_eq!(status, 401);
    assert_eq!(h.served().requests, 0, "nothing reached the upstream");
    assert!(h
        .gateway
        .store
        .recent_forwarded(10)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .is_empty());
}

#[tokio::test]
async fn an_allowed_path_is_forwarded_with_the_upstream_key_and_recorded() {
    let h = start("isolation-allowed", &config()).await;
    let r = h
        .post("/moderations?x=secret-query", MODS)
        .json(&json!({"input": "hi"}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The simulator has no moderations: its own 404 comes back.
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or_default();
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        body["error"]["message"],
        "Invalid URL (POST /v1/moderations)"
    );
    // The simulator saw the gateway's upstream key, not the client's.
    assert_eq!(h.served().requests, 1);
    assert!(!h.sim.stats().contains_key(MODS));
    assert!(h.sim.stats().contains_key(UPSTREAM_KEY));
    // A rule allows its method only.
    let (status, _) = raw(&h, "GET", "/v1/moderations", MODS, "").await;
    assert_eq!(status, 404);
    assert_eq!(h.served().requests, 1);
    // The metered ledger has no row; the forwarded calls' ledger has one.
    assert!(h
        .gateway
        .store
        .recent(10)
        .await
        .unwrap_or_default()
        .is_empty());
    let forwarded = h
        .gateway
        .store
        .recent_forwarded(10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(forwarded.len(), 1, "{forwarded:?}");
    let row = &forwarded[0];
    assert_eq!(
        (
            &*row.org,
            &*row.project,
            row.method,
            row.path.as_str(),
            row.status
        ),
        ("acme", "mods", "POST", "/moderations", 404)
    );
    assert!(!row.key_id.is_empty() && row.latency_ms < 60_000);
}

#[tokio::test]
async fn another_spelling_of_a_route_is_served_as_it_or_refused_never_forwarded() {
    let h = start("isolation-spellings", &config()).await;
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).to_string();
    for path in [
        "/v1//chat/completions",
        "/v1/chat/completions/",
        "/v1/./chat/completions",
        "/v1/x/../chat/completions",
        "/v1/Chat/Completions",
        "/v1/chat%2Fcompletions",
        "/v1/chat/completions;x",
        "/v1/moderations/../chat/completions",
        "/v1/moderations/..",
        "/v1/moderations/%2e%2e/files",
        "/v1/models/../files",
        "/v1/organization/usage/completions/",
        "/v1//organization/usage/completions",
        "/v1/organization/./costs",
        "//v1/chat/completions",
    ] {
        for key in [PLAIN, MODS] {
            let (status, body) = raw(&h, "POST", path, key, &chat).await;
            assert_eq!(status, 404, "POST {path}: {body}");
            let (status, body) = raw(&h, "GET", path, key, "").await;
            assert_eq!(status, 404, "GET {path}: {body}");
        }
    }
    assert_eq!(h.served().requests, 0, "nothing reached the upstream");
    assert!(h
        .gateway
        .store
        .recent(10)
        .await
        .unwrap_or_default()
        .is_empty());
    // The plain spelling is served as the metered route.
    let (status, body) = raw(&h, "POST", "/v1/chat/completions", PLAIN, &chat).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(h.served().requests, 1);
}

#[tokio::test]
async fn a_404_echoes_only_a_short_prefix_of_the_path() {
    let h = start("isolation-echo", &config()).await;
    let long = format!("/v1/{}", "a".repeat(4000));
    let (status, body) = raw(&h, "GET", &long, PLAIN, "").await;
    assert_eq!(status, 404);
    assert!(body.len() < 600, "{} bytes", body.len());
}

/// The dashboard shows what went past the meter: who, which method and path.
#[tokio::test]
async fn the_dashboard_shows_forwarded_calls() {
    const ADMIN: &str = "admin-token-isolation-0001";
    let h = start_with_server(
        "isolation-dashboard",
        &config(),
        &format!("admin_token = \"{ADMIN}\"\n"),
    )
    .await;
    let root = h.base.trim_end_matches("/v1").to_owned();
    let r = h
        .post("/moderations?q=hidden", MODS)
        .json(&json!({"input": "hi"}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 404);
    let page = dashboard_page(&root, ADMIN).await;
    let section = page
        .split("Forwarded past the meter")
        .nth(1)
        .and_then(|rest| rest.split("</table>").next())
        .unwrap_or_else(|| panic!("no forwarded section in {page}"));
    assert!(section.contains("data-value=\"1\""), "{section}");
    assert!(
        section.contains("<td>mods</td>")
            && section.contains("<td>POST</td><td>/v1/moderations</td><td>404</td>"),
        "{section}"
    );
    assert!(!section.contains("hidden"), "the query is not kept");
}
