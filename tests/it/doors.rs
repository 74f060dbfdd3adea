//! Hostile input at the gateway's doors (issue 20): the `Authorization`
//! scheme in any case, the dashboard's sign-in throttle and its `Origin`
//! check, names that try to break the dashboard's event stream, one label
//! set per `/metrics` series, and the simulator's own bounds.

use serde_json::json;

use crate::harness::{start_with_server, Harness};

const ADMIN: &str = "admin-token-doors-000001";
const KEY: &str = "tw-doors-app-00000000001";

fn config() -> String {
    format!("[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{KEY}\"]\n")
}

async fn gateway(label: &str) -> Harness {
    start_with_server(label, &config(), &format!("admin_token = \"{ADMIN}\"\n")).await
}

fn root(h: &Harness) -> String {
    h.base.trim_end_matches("/v1").to_owned()
}

/// A client that does not follow redirects, optionally from a given local
/// address (any 127.0.0.0/8 address reaches the gateway on Linux).
fn client_from(local: Option<&str>) -> reqwest::Client {
    tokenwarden::gateway::upstream::install_crypto_provider();
    let mut builder = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
    if let Some(local) = local {
        let ip: std::net::IpAddr = local.parse().unwrap_or_else(|e| panic!("{e}"));
        builder = builder.local_address(ip);
    }
    builder.build().unwrap_or_else(|e| panic!("{e}"))
}

// ---- 1. `Authorization: bearer KEY`, the scheme in any case ------------------

/// RFC 9110 (11.1): the authentication scheme is case-insensitive.
#[tokio::test]
async fn the_bearer_scheme_is_accepted_in_any_case() {
    let h = gateway("doors-bearer").await;
    let root = root(&h);
    let client = client_from(None);
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let models = client
            .get(format!("{}/models", h.base))
            .header("authorization", format!("{scheme} {KEY}"))
            .send()
            .await
            .map(|r| r.status().as_u16());
        assert_eq!(models.unwrap_or(0), 200, "GET /v1/models with {scheme}");
        let chat = client
            .post(format!("{}/chat/completions", h.base))
            .header("authorization", format!("{scheme} {KEY}"))
            .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}))
            .send()
            .await
            .map(|r| r.status().as_u16());
        assert_eq!(chat.unwrap_or(0), 200, "a metered call with {scheme}");
        for path in ["/metrics", "/v1/organization/costs?start_time=0"] {
            let admin = client
                .get(format!("{root}{path}"))
                .header("authorization", format!("{scheme} {ADMIN}"))
                .send()
                .await
                .map(|r| r.status().as_u16());
            assert_eq!(admin.unwrap_or(0), 200, "{path} with {scheme}");
        }
    }
    // Another scheme, or the scheme glued to the key, is still refused.
    for value in [
        format!("Basic {KEY}"),
        format!("Bearer{KEY}"),
        KEY.to_owned(),
    ] {
        let refused = client
            .get(format!("{}/models", h.base))
            .header("authorization", value.clone())
            .send()
            .await
            .map(|r| r.status().as_u16());
        assert_eq!(refused.unwrap_or(0), 401, "{value}");
    }
}
