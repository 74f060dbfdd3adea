//! What the upstream keeps of a project's calls (stored responses and chat
//! completions): reachable through the gateway for a project alone on its
//! upstream, and for no project that shares one.

use serde_json::{json, Value};

use crate::harness::start;

const ALONE: &str = "tw-stored-alone-000000001";
const WEB: &str = "tw-stored-web-00000000001";
const LAB: &str = "tw-stored-lab-00000000001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_alone_on_its_upstream_reads_what_it_kept() {
    let config = format!(
        "[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{ALONE}\"]\n"
    );
    let h = start("stored-alone", &config).await;
    let stdout = crate::harness::python("python_stored_gateway.py", &[&h.base, ALONE]).await;
    assert!(stdout.contains("python stored gateway ok"), "{stdout}");
    // The continued response was metered with what the upstream billed:
    // its input counted the first response's input and output again.
    let mut numbers = stdout.lines().filter_map(|l| l.parse::<u64>().ok());
    let billed = numbers.next().unwrap_or(0);
    let compacted = numbers.next().unwrap_or(0);
    h.settled().await;
    let records = h.gateway.store.recent(20).await.unwrap_or_default();
    assert!(
        records.iter().any(|r| r.input == billed && !r.estimated),
        "{billed}: {records:?}"
    );
    // The compaction was metered with the usage the upstream reported.
    assert!(
        records
            .iter()
            .any(|r| r.input + r.output == compacted && !r.estimated),
        "{compacted}: {records:?}"
    );
    assert!(records.iter().all(|r| r.state == "settled"));
    // The reads went upstream unmetered, recorded as forwarded calls.
    let forwarded = h
        .gateway
        .store
        .recent_forwarded(50)
        .await
        .unwrap_or_default();
    assert!(forwarded
        .iter()
        .any(|f| f.method == "GET" && f.path.starts_with("/responses/")));
    assert!(forwarded
        .iter()
        .any(|f| f.method == "DELETE" && f.path.starts_with("/chat/completions/")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_that_share_an_upstream_cannot_reach_what_it_kept() {
    let config = format!(
        "[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"web\"\nkeys = [\"{WEB}\"]\n\n[[orgs.projects]]\nname = \"lab\"\nkeys = [\"{LAB}\"]\n"
    );
    let h = start("stored-shared", &config).await;
    let made: Value = h
        .post("/responses", WEB)
        .json(&json!({"model": "gpt-4o-mini", "input": "secret plans", "max_output_tokens": 4}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    let id = made["id"].as_str().unwrap_or_default().to_owned();
    assert!(id.starts_with("resp_"), "{made}");
    let served = h.served().requests;
    // Another project continuing it, or reading it: refused before the upstream.
    for key in [LAB, WEB] {
        let r = h
            .post("/responses", key)
            .json(&json!({"model": "gpt-4o-mini", "input": "go on", "previous_response_id": id}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status().as_u16(), 400);
        let body: Value = r.json().await.unwrap_or_default();
        assert_eq!(
            body["error"]["code"], "stored_state_not_available",
            "{body}"
        );
        assert_eq!(body["error"]["param"], "previous_response_id");
        for (method, path) in [
            (reqwest::Method::GET, format!("/responses/{id}")),
            (reqwest::Method::GET, format!("/responses/{id}/input_items")),
            (reqwest::Method::DELETE, format!("/responses/{id}")),
            (reqwest::Method::GET, "/chat/completions".to_owned()),
            (
                reqwest::Method::DELETE,
                "/models/ft:gpt-4o-mini:acme::abc123".to_owned(),
            ),
        ] {
            let r = h
                .client
                .request(method.clone(), format!("{}{path}", h.base))
                .bearer_auth(key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.status().as_u16(), 404, "{method} {path}");
        }
    }
    assert_eq!(h.served().requests, served, "nothing reached the upstream");
}
