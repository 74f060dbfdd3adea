//! Each organization's own part: which models a project may use, admin
//! keys bound to one org.

use serde_json::{json, Value};

use crate::harness::start;

const LIMITED: &str = "tw-tenants-limited-000001";
const OPEN: &str = "tw-tenants-open-000000001";

#[tokio::test]
async fn a_project_calls_only_the_models_it_lists() {
    let config = format!(
        "[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"web\"\nmodels = [\"gpt-4o-mini\", \"gpt-4.1-*\"]\nkeys = [\"{LIMITED}\"]\n\n[[orgs.projects]]\nname = \"lab\"\nkeys = [\"{OPEN}\"]\n"
    );
    let h = start("tenants-models", &config).await;
    let call = |key: &'static str, model: &'static str| {
        h.post("/chat/completions", key)
            .json(&json!({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    for model in ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4.1-nano"] {
        let r = call(LIMITED, model).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status().as_u16(), 200, "{model}");
    }
    let served = h.served().requests;
    let r = call(LIMITED, "gpt-4o")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 403);
    let body: Value = r.json().await.unwrap_or_default();
    assert_eq!(
        body,
        json!({"error": {
            "message": "Project `web` does not have access to model `gpt-4o`",
            "type": "invalid_request_error",
            "param": null,
            "code": "model_not_found",
        }})
    );
    assert_eq!(h.served().requests, served, "nothing went upstream");
    assert_eq!(
        call(OPEN, "gpt-4o")
            .await
            .map_or(0, |r| r.status().as_u16()),
        200
    );

    // /v1/models lists what the key may use.
    let h = &h;
    let list = |key: &'static str| async move {
        let r = h
            .client
            .get(format!("{}/models", h.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let body: Value = r.json().await.unwrap_or_default();
        body["data"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let limited = list(LIMITED).await;
    assert!(limited.contains(&"gpt-4o-mini".to_owned()), "{limited:?}");
    assert!(
        limited
            .iter()
            .all(|m| m == "gpt-4o-mini" || m.starts_with("gpt-4.1-")),
        "{limited:?}"
    );
    let open = list(OPEN).await;
    assert!(open.contains(&"gpt-4o".to_owned()) && open.len() > limited.len());

    // /v1/models/{id} answers a model the key may use, else OpenAI's 404.
    let one = |key: &'static str, model: &'static str| async move {
        let r = h
            .client
            .get(format!("{}/models/{model}", h.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (
            r.status().as_u16(),
            r.json::<Value>().await.unwrap_or_default(),
        )
    };
    let (status, body) = one(LIMITED, "gpt-4.1-mini").await;
    assert_eq!(
        (status, &body["id"], &body["object"]),
        (200, &json!("gpt-4.1-mini"), &json!("model"))
    );
    for (key, model) in [(LIMITED, "gpt-4o"), (OPEN, "no-such-model")] {
        let (status, body) = one(key, model).await;
        assert_eq!(status, 404, "{model}");
        assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    }
    // A catalog pattern is no model.
    assert_eq!(one(OPEN, "gpt-4.1-*").await.0, 404);
    assert_eq!(one(OPEN, "gpt-4o").await.0, 200);
    assert_eq!(
        h.served().requests,
        served + 1,
        "nothing more went upstream"
    );
}

const PLATFORM: &str = "tw-tenants-platform-admin-01";
const ALPHA_ADMIN: &str = "tw-tenants-alpha-admin-0001";
const ALPHA_KEY: &str = "tw-tenants-alpha-key-000001";
const BRAVO_KEY: &str = "tw-tenants-bravo-key-000001";

/// Two orgs, each with an admin key of its own; a call in each.
async fn two_orgs(label: &str) -> crate::harness::Harness {
    let config = format!(
        "[[orgs]]\nname = \"alphaorg\"\nadmin_keys = [\"{ALPHA_ADMIN}\"]\nalerts = {{ used_percent = [1] }}\n\n[[orgs.projects]]\nname = \"alphaproj\"\nkeys = [\"{ALPHA_KEY}\"]\nforward = [\"POST /moderations\"]\n\n[[orgs]]\nname = \"bravoorg\"\nadmin_keys = [\"tw-tenants-bravo-admin-0001\"]\nalerts = {{ used_percent = [1] }}\n\n[[orgs.projects]]\nname = \"bravoproj\"\nkeys = [\"{BRAVO_KEY}\"]\nforward = [\"POST /moderations\"]\n\n[program.groups.mini]\ndaily_tokens = 1000\n"
    );
    let h = crate::harness::start_with_server(
        label,
        &config,
        &format!("admin_token = \"{PLATFORM}\"\n"),
    )
    .await;
    for (key, model) in [(ALPHA_KEY, "gpt-4o-mini"), (BRAVO_KEY, "gpt-4.1-mini")] {
        let r = h
            .post("/chat/completions", key)
            .json(&json!({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hello there"}]}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status().as_u16(), 200);
        let r = h
            .post("/moderations", key)
            .json(&json!({"input": "x"}))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16());
        assert_ne!(r, 0);
    }
    h.settled().await;
    h
}

/// What org B's data looks like wherever it could show: its org, project,
/// model, and its key's id.
fn bravo_marks(h: &crate::harness::Harness) -> Vec<String> {
    let _ = h;
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(BRAVO_KEY.as_bytes());
    let key_id: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    vec![
        "bravoorg".into(),
        "bravoproj".into(),
        "gpt-4.1-mini".into(),
        key_id,
    ]
}

async fn get(h: &crate::harness::Harness, path: &str, token: &str) -> (u16, String) {
    let root = h.base.trim_end_matches("/v1");
    let r = h
        .client
        .get(format!("{root}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test]
async fn an_org_admin_key_sees_its_org_and_no_byte_of_another() {
    let h = two_orgs("tenants-scope").await;
    let start = h.today().start_unix();
    let marks = bravo_marks(&h);
    let leaks = |text: &str| -> Vec<String> {
        marks
            .iter()
            .filter(|m| text.contains(m.as_str()))
            .cloned()
            .collect()
    };
    let mut routes = Vec::new();
    for group_by in [
        "",
        "&group_by=project_id",
        "&group_by=api_key_id",
        "&group_by=model",
        "&group_by=lane,sharing",
    ] {
        for org in ["", "&org=bravoorg", "&org=alphaorg"] {
            routes.push(format!(
                "/v1/organization/usage/completions?start_time={start}{group_by}{org}"
            ));
        }
    }
    for group_by in ["", "&group_by=project_id", "&group_by=line_item"] {
        for org in ["", "&org=bravoorg"] {
            routes.push(format!(
                "/v1/organization/costs?start_time={start}{group_by}{org}"
            ));
        }
    }
    // The admin API's own routes answer for alphaorg only.
    for route in [
        "/v1/organization/data_sharing",
        "/v1/organization/projects",
        "/v1/organization/projects?include_archived=true",
        "/v1/organization/projects/alphaproj",
        "/v1/organization/projects/alphaproj/api_keys",
        "/v1/organization/projects/alphaproj/service_accounts",
        "/v1/organization/projects/alphaproj/model_permissions",
        "/v1/organization/admin_api_keys",
    ] {
        routes.push(route.to_owned());
    }
    for route in [
        "/v1/organization/projects/bravoproj",
        "/v1/organization/projects/bravoproj/api_keys",
        "/v1/organization/projects/bravoproj/model_permissions",
    ] {
        let (status, text) = get(&h, route, ALPHA_ADMIN).await;
        assert_eq!(status, 404, "{route}: {text}");
        // Word for word what a project that is nowhere gets: org B's
        // projects are not even known to exist.
        let nowhere = route.replace("bravoproj", "nosuchproj");
        let (_, other) = get(&h, &nowhere, ALPHA_ADMIN).await;
        assert_eq!(text.replace("bravoproj", "nosuchproj"), other, "{route}");
        let (status, _) = get(&h, route, PLATFORM).await;
        assert_eq!(status, 400, "{route}: the platform must name an org");
    }
    for route in &routes {
        let (status, text) = get(&h, route, ALPHA_ADMIN).await;
        assert_eq!(status, 200, "{route}: {text}");
        assert!(
            leaks(&text).is_empty(),
            "{route} leaks {:?}: {text}",
            leaks(&text)
        );
        // The platform's token sees org B there (so the check above can fail).
        if route.contains("group_by=project_id") && !route.contains("org=alphaorg") {
            let (_, all) = get(&h, route, PLATFORM).await;
            assert!(all.contains("bravoproj"), "{route}: {all}");
            assert!(
                text.contains("alphaproj") || route.contains("org=bravoorg"),
                "{route}: {text}"
            );
        }
    }
    // /metrics is the platform's.
    let (status, text) = get(&h, "/metrics", ALPHA_ADMIN).await;
    assert_eq!(status, 403, "{text}");
    assert!(leaks(&text).is_empty());
    let (status, text) = get(&h, "/metrics", PLATFORM).await;
    assert_eq!(status, 200);
    assert!(text.contains("bravoorg"));

    // The dashboard, page and live events.
    let root = h.base.trim_end_matches("/v1");
    let page = crate::harness::dashboard_page(root, ALPHA_ADMIN).await;
    assert!(
        page.contains("alphaorg") && page.contains("alphaproj"),
        "{page}"
    );
    assert!(leaks(&page).is_empty(), "the page leaks {:?}", leaks(&page));
    let all = crate::harness::dashboard_page(root, PLATFORM).await;
    assert!(
        marks.iter().all(|m| all.contains(m.as_str())),
        "{:?}",
        leaks(&all)
    );
    let event = first_event(root, ALPHA_ADMIN).await;
    assert!(event.contains("alphaproj"), "{event}");
    assert!(
        leaks(&event).is_empty(),
        "the events leak {:?}",
        leaks(&event)
    );
    let event = first_event(root, PLATFORM).await;
    assert!(event.contains("bravoproj"));
}

/// The first `update` event of the dashboard's live stream, signed in with `token`.
async fn first_event(root: &str, token: &str) -> String {
    let (client, cookie) = crate::harness::dashboard_session(root, token).await;
    let mut events = client
        .get(format!("{root}/dashboard/events"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut text = String::new();
    while !text.contains("\n\n") {
        match tokio::time::timeout(std::time::Duration::from_secs(10), events.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("no event: {other:?}"),
        }
    }
    text
}
