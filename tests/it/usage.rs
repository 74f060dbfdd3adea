//! The usage API in OpenAI's shape, against traffic the test drove.

use serde_json::{json, Value};

use crate::harness::{start, start_with_server, Harness, NOON_MS};

const ADMIN: &str = "admin-token-for-tests-0001";
const APP: &str = "tw-usage-app-000000000001";
const BATCH: &str = "tw-usage-batch-0000000001";

fn config() -> String {
    format!(
        "[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{APP}\"]\n\n[[orgs.projects]]\nname = \"batch\"\nkeys = [\"{BATCH}\"]\n\n[program.groups.flagship]\ndaily_tokens = 1000\n"
    )
}

const DAY_START: i64 = NOON_MS / 1000 - 12 * 3600;

async fn call(h: &Harness, key: &str, model: &str, output: u64) {
    let body = json!({"model": model, "max_tokens": output, "messages": [{"role": "user", "content": "Hello!"}]});
    let r = h
        .post("/chat/completions", key)
        .header("x-sim-output-tokens", output.to_string())
        .json(&body)
        .send()
        .await;
    assert_eq!(r.map(|r| r.status().as_u16()).unwrap_or(0), 200);
}

async fn get(h: &Harness, path_and_query: &str, token: &str) -> (u16, Value) {
    let r = h
        .client
        .get(format!("{}{path_and_query}", h.base))
        .bearer_auth(token)
        .send()
        .await;
    let r = r.unwrap_or_else(|e| panic!("{e}"));
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

/// 12:00: app gpt-4o twice (25 and 509 tokens); 13:30: batch gpt-4o (509, billed: past the cap) and gpt-4o-mini.
async fn traffic() -> Harness {
    let h = start_with_server("usage", &config(), &format!("admin_token = \"{ADMIN}\"\n")).await;
    call(&h, APP, "gpt-4o", 16).await;
    call(&h, APP, "gpt-4o", 500).await;
    h.clock.set(NOON_MS + 90 * 60 * 1000);
    call(&h, BATCH, "gpt-4o", 500).await;
    call(&h, BATCH, "gpt-4o-mini", 16).await;
    h
}

#[tokio::test]
async fn hourly_buckets_grouped_by_project_and_model_match_the_ledger() {
    let h = traffic().await;
    let query = format!(
        "/organization/usage/completions?start_time={DAY_START}&end_time={}&bucket_width=1h&group_by=project_id&group_by=model&limit=24",
        DAY_START + 86_400
    );
    let (status, page) = get(&h, &query, ADMIN).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["object"], "page");
    assert_eq!(page["has_more"], false);
    let buckets = page["data"].as_array().cloned().unwrap_or_default();
    assert_eq!(buckets.len(), 24);
    // Without end_time the buckets stop at the current one (13:30 here).
    let (_, until_now) = get(
        &h,
        &format!("/organization/usage/completions?start_time={DAY_START}&bucket_width=1h&limit=24"),
        ADMIN,
    )
    .await;
    assert_eq!(until_now["data"].as_array().map(Vec::len), Some(14));
    assert_eq!(buckets[12]["object"], "bucket");
    assert_eq!(buckets[12]["start_time"], DAY_START + 12 * 3600);
    assert_eq!(buckets[12]["end_time"], DAY_START + 13 * 3600);
    let noon = buckets[12]["results"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(noon.len(), 1, "{noon:?}");
    let r = &noon[0];
    assert_eq!(r["object"], "organization.usage.completions.result");
    assert_eq!(
        (r["project_id"].as_str(), r["model"].as_str()),
        (Some("app"), Some("gpt-4o"))
    );
    assert_eq!(
        (
            r["input_tokens"].as_u64(),
            r["output_tokens"].as_u64(),
            r["num_model_requests"].as_u64()
        ),
        (Some(18), Some(516), Some(2))
    );
    assert!(r["api_key_id"].is_null() && r["user_id"].is_null() && r["batch"].is_null());
    let afternoon = buckets[13]["results"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(afternoon.len(), 2);
    assert!(buckets
        .iter()
        .enumerate()
        .all(|(i, b)| i == 12 || i == 13 || b["results"].as_array().is_some_and(Vec::is_empty)));

    // The totals agree with the ledger's records.
    let records = h.gateway.store.recent(10).await.unwrap_or_default();
    let ledger: u64 = records.iter().map(|r| r.input + r.output).sum();
    let api: u64 = buckets
        .iter()
        .flat_map(|b| b["results"].as_array().cloned().unwrap_or_default())
        .map(|r| r["input_tokens"].as_u64().unwrap_or(0) + r["output_tokens"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(api, ledger);
}

#[tokio::test]
async fn lanes_split_free_from_billed_and_costs_price_the_billed() {
    let h = traffic().await;
    let (_, page) = get(
        &h,
        &format!("/organization/usage/completions?start_time={DAY_START}&group_by=lane&limit=1"),
        ADMIN,
    )
    .await;
    let results = page["data"][0]["results"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let lane = |name: &str| {
        results.iter().find(|r| r["lane"] == name).map(|r| {
            r["input_tokens"].as_u64().unwrap_or(0) + r["output_tokens"].as_u64().unwrap_or(0)
        })
    };
    // 25 + 509 of gpt-4o fit in 1,000; the next 509 did not; gpt-4o-mini is free.
    assert_eq!(
        (lane("free"), lane("billed")),
        (Some(25 + 509 + 25), Some(509))
    );

    let (status, costs) = get(
        &h,
        &format!("/organization/costs?start_time={DAY_START}&group_by=line_item&limit=1"),
        ADMIN,
    )
    .await;
    assert_eq!(status, 200, "{costs}");
    let results = costs["data"][0]["results"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let billed = results
        .iter()
        .find(|r| r["line_item"] == "billed")
        .cloned()
        .unwrap_or_default();
    assert_eq!(billed["object"], "organization.costs.result");
    assert_eq!(billed["amount"]["currency"], "usd");
    // 9 input tokens at $2.50 and 500 output tokens at $10.00 per million.
    assert_eq!(billed["amount_pico"], 9u64 * 2_500_000 + 500 * 10_000_000);
    assert!((billed["amount"]["value"].as_f64().unwrap_or(0.0) - 0.0050225).abs() < 1e-12);
}

#[tokio::test]
async fn pages_follow_next_page() {
    let h = traffic().await;
    let base = format!(
        "/organization/usage/completions?start_time={DAY_START}&end_time={}&bucket_width=1h&limit=10",
        DAY_START + 86_400
    );
    let (_, first) = get(&h, &base, ADMIN).await;
    assert_eq!(
        (first["has_more"].as_bool(), first["next_page"].as_str()),
        (Some(true), Some("10"))
    );
    let (_, second) = get(&h, &format!("{base}&page=10"), ADMIN).await;
    assert_eq!(second["data"][0]["start_time"], DAY_START + 10 * 3600);
    assert_eq!(second["data"][2]["results"][0]["num_model_requests"], 2);
    assert_eq!(second["next_page"], "20");
    let (_, third) = get(&h, &format!("{base}&page=20"), ADMIN).await;
    assert_eq!(
        (
            third["has_more"].as_bool(),
            third["data"].as_array().map(Vec::len)
        ),
        (Some(false), Some(4))
    );
}

#[tokio::test]
async fn the_admin_token_guards_it_and_bad_parameters_are_400s() {
    let h = traffic().await;
    let ok = format!("/organization/usage/completions?start_time={DAY_START}");
    assert_eq!(get(&h, &ok, "wrong-token").await.0, 401);
    assert_eq!(
        get(&h, &ok, APP).await.0,
        401,
        "a client key is not the admin token"
    );
    // An admin route that does not exist: 404 to an admin, 401 to others.
    let (status, body) = get(&h, "/organization/usage/everything?start_time=0", ADMIN).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "unknown_url", "{body}");
    assert_eq!(
        get(&h, "/organization/usage/everything", "wrong-token")
            .await
            .0,
        401
    );
    for (query, param) in [
        ("/organization/usage/completions", "start_time"),
        (
            &*format!("/organization/usage/completions?start_time={DAY_START}&bucket_width=1w"),
            "bucket_width",
        ),
        (
            &*format!("/organization/usage/completions?start_time={DAY_START}&group_by=colour"),
            "group_by",
        ),
        (
            &*format!(
                "/organization/usage/completions?start_time={DAY_START}&bucket_width=1d&limit=40"
            ),
            "limit",
        ),
        (
            &*format!(
                "/organization/usage/completions?start_time={DAY_START}&end_time={DAY_START}"
            ),
            "end_time",
        ),
    ] {
        let (status, body) = get(&h, query, ADMIN).await;
        assert_eq!(
            (status, body["error"]["param"].as_str()),
            (400, Some(param)),
            "{query}: {body}"
        );
    }
    // Without an admin token configured, the usage API is closed to everyone.
    let closed = start("usage-closed", &config()).await;
    assert_eq!(get(&closed, &ok, "").await.0, 401);
}

#[tokio::test]
async fn sharing_splits_shared_from_private_tokens() {
    let config = format!(
        "[[orgs]]\nname = \"acme\"\nsharing = \"selected\"\n\n[[orgs.projects]]\nname = \"app\"\nsharing = true\nkeys = [\"{APP}\"]\n\n[[orgs.projects]]\nname = \"batch\"\nsharing = false\nkeys = [\"{BATCH}\"]\n"
    );
    let h = start_with_server(
        "usage-sharing",
        &config,
        &format!("admin_token = \"{ADMIN}\"\n"),
    )
    .await;
    call(&h, APP, "gpt-4o", 16).await;
    call(&h, BATCH, "gpt-4o", 500).await;
    let (status, page) = get(
        &h,
        &format!("/organization/usage/completions?start_time={DAY_START}&bucket_width=1d&group_by=sharing"),
        ADMIN,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let results = page["data"][0]["results"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let tokens = |kind: &str| {
        results.iter().find(|r| r["sharing"] == kind).map(|r| {
            r["input_tokens"].as_u64().unwrap_or(0) + r["output_tokens"].as_u64().unwrap_or(0)
        })
    };
    // The shared call was the app's (16 out), the private one the batch's (500 out).
    assert_eq!(tokens("shared"), Some(25));
    assert_eq!(tokens("private"), Some(509));
}
