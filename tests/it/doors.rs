//! Hostile input at the gateway's doors (issue 20): the `Authorization`
//! scheme in any case, the dashboard's sign-in throttle and its `Origin`
//! check, names that try to break the dashboard's event stream, one label
//! set per `/metrics` series, and the simulator's own bounds.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::harness::{spawn, start_with_server, Harness};

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

async fn sign_in(client: &reqwest::Client, root: &str, token: &str) -> reqwest::Response {
    client
        .post(format!("{root}/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The session cookie (`tw_session=...`) a successful sign-in set.
fn session(response: &reqwest::Response) -> String {
    let cookie = response
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    cookie.split(';').next().unwrap_or_default().to_owned()
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

// ---- 2. The sign-in throttle --------------------------------------------------

/// Repeated wrong tokens from one address lock that address out (429 with
/// `Retry-After`), even with the right token, while another address signs
/// in; the lock ends when its time is up.
#[tokio::test]
async fn repeated_wrong_sign_ins_lock_the_address_out() {
    let h = gateway("doors-throttle").await;
    let root = root(&h);
    let attacker = client_from(Some("127.0.0.1"));
    let mut statuses = Vec::new();
    for i in 0..40 {
        let r = sign_in(&attacker, &root, &format!("wrong-token-{i:04}")).await;
        statuses.push(r.status().as_u16());
    }
    let refused = statuses.iter().filter(|&&s| s == 401).count();
    assert!(
        (1..=5).contains(&refused),
        "at most 5 wrong tokens are checked before the lock: {statuses:?}"
    );
    assert!(
        statuses[refused..].iter().all(|&s| s == 429),
        "{statuses:?}"
    );

    let locked = sign_in(&attacker, &root, ADMIN).await;
    assert_eq!(
        locked.status().as_u16(),
        429,
        "the right token while locked"
    );
    let retry: u64 = locked
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(retry >= 1, "Retry-After: {retry}");
    assert!(locked.headers().get("set-cookie").is_none());

    // Another address is not affected.
    let other = client_from(Some("127.0.0.2"));
    let good = sign_in(&other, &root, ADMIN).await;
    assert_eq!(good.status().as_u16(), 303, "another address signs in");

    // Past the lock, the right token works again from the first address.
    h.clock
        .set(crate::harness::NOON_MS + (retry as i64 + 1) * 1000);
    let after = sign_in(&attacker, &root, ADMIN).await;
    assert_eq!(after.status().as_u16(), 303, "after Retry-After");
}

// ---- 3. The dashboard's POST routes check `Origin` ------------------------------

#[tokio::test]
async fn dashboard_posts_from_another_origin_are_refused() {
    let h = gateway("doors-origin").await;
    let root = root(&h);
    let client = client_from(None);
    let host = root.trim_start_matches("http://").to_owned();
    let post = |path: &str, origin: Option<&str>, cookie: Option<&str>| {
        let mut request = client
            .post(format!("{root}{path}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={ADMIN}"));
        if let Some(origin) = origin {
            request = request.header("origin", origin.to_owned());
        }
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie.to_owned());
        }
        request.send()
    };
    let other_port = format!("http://127.0.0.1:{}", 1);
    for origin in [
        "http://evil.example",
        "null",
        other_port.as_str(),
        "http://127.0.0.1.evil.example",
    ] {
        let r = post("/dashboard/login", Some(origin), None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status().as_u16(), 403, "Origin: {origin}");
        assert!(r.headers().get("set-cookie").is_none(), "Origin: {origin}");
    }
    // The gateway's own origin, and no Origin at all (a non-browser client).
    let own = post("/dashboard/login", Some(&format!("http://{host}")), None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(own.status().as_u16(), 303);
    let cookie = session(&own);
    let bare = post("/dashboard/login", None, None)
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(bare.unwrap_or(0), 303);

    // A cross-site sign-out does not end the session.
    let out = post(
        "/dashboard/logout",
        Some("http://evil.example"),
        Some(&cookie),
    )
    .await
    .map(|r| r.status().as_u16());
    assert_eq!(out.unwrap_or(0), 403);
    let page = client
        .get(format!("{root}/dashboard"))
        .header("cookie", cookie.clone())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default();
    assert!(page.contains("data-metric"), "still signed in");
}

// ---- 4. Names cannot break the dashboard's event stream -------------------------

/// One parsed server-sent event: its type and the values of its fields.
#[derive(Debug)]
struct Event {
    kind: String,
    data: Vec<String>,
}

/// Events as a browser's `EventSource` reads them (the HTML spec's
/// parser: lines end at CRLF, a lone CR or a lone LF; a blank line ends
/// an event), with every field name seen.
fn parse_events(text: &str) -> (Vec<Event>, HashSet<String>) {
    let (mut events, mut fields) = (Vec::new(), HashSet::new());
    let (mut kind, mut data) = (String::new(), Vec::new());
    let mut lines = Vec::new();
    let mut rest = text;
    while let Some(end) = rest.find(['\r', '\n']) {
        lines.push(&rest[..end]);
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
    }
    for line in lines {
        if line.is_empty() {
            if !data.is_empty() {
                let kind = if kind.is_empty() {
                    "message".to_owned()
                } else {
                    std::mem::take(&mut kind)
                };
                events.push(Event {
                    kind,
                    data: std::mem::take(&mut data),
                });
            }
            kind.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        fields.insert(field.to_owned());
        match field {
            "event" => kind = value.to_owned(),
            "data" => data.push(value.to_owned()),
            _ => {}
        }
    }
    (events, fields)
}

#[tokio::test]
async fn a_model_name_cannot_inject_events_into_the_live_stream() {
    let h = gateway("doors-events").await;
    let root = root(&h);
    let client = client_from(None);
    let hostile =
        "ft:gpt-4o-mini:x\r\revent: evil\rdata: pwned\r\n\r\nevent: evil2\ndata: pwned2\n\nx";
    let call = h
        .post("/chat/completions", KEY)
        .json(&json!({"model": hostile, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(call.unwrap_or(0), 200, "the call itself is served");
    h.settled().await;

    let signed = sign_in(&client, &root, ADMIN).await;
    assert_eq!(signed.status().as_u16(), 303);
    let response = client
        .get(format!("{root}/dashboard/events"))
        .header("cookie", session(&signed))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 200);
    // The first update: everything up to the first blank line the server
    // itself wrote (a frame ends in "\n\n").
    let mut stream = response.bytes_stream();
    let mut raw = Vec::new();
    while !raw.windows(2).any(|w| w == b"\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap_or_else(|_| panic!("no update within 10 s"));
        match chunk {
            Some(Ok(bytes)) => raw.extend_from_slice(&bytes),
            other => panic!("the stream ended: {other:?}"),
        }
    }
    let text = String::from_utf8_lossy(&raw).to_string();
    let end = text.find("\n\n").map_or(text.len(), |i| i + 2);
    let (events, fields) = parse_events(&text[..end]);
    assert_eq!(events.len(), 1, "one update, one event: {events:#?}");
    assert!(events.iter().all(|e| e.kind == "update"), "{events:#?}");
    assert!(
        fields.iter().all(|f| f == "data" || f == "event"),
        "{fields:?}"
    );
    let data = events[0].data.join("\n");
    assert!(
        data.contains("ft:gpt-4o-mini:x"),
        "the name is shown, as text"
    );
    assert!(
        events[0]
            .data
            .iter()
            .all(|line| !line.starts_with("pwned") && !line.starts_with("evil")),
        "an injected line became a field: {:?}",
        events[0].data
    );
}

// ---- 5. One label set per /metrics series ---------------------------------------

/// Every sample line of `text` as (name, sorted labels) -> value.
fn series(text: &str) -> Vec<(String, Vec<String>, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            let mut labels: Vec<String> = labels
                .trim_end_matches('}')
                .split("\",")
                .filter(|p| !p.is_empty())
                .map(|p| p.trim_end_matches('"').to_owned())
                .collect();
            labels.sort();
            Some((name.to_owned(), labels, value.to_owned()))
        })
        .collect()
}

async fn scrape(h: &Harness) -> String {
    h.client
        .get(format!("{}/metrics", root(h)))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default()
}

#[tokio::test]
async fn a_fine_tuned_call_does_not_relabel_its_base_models_series() {
    let h = gateway("doors-metrics").await;
    let call = |model: &'static str| {
        h.post("/chat/completions", KEY)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "Hi"}]}))
            .send()
    };
    let first = call("gpt-4o-mini").await.map(|r| r.status().as_u16());
    assert_eq!(first.unwrap_or(0), 200);
    h.settled().await;
    let before = series(&scrape(&h).await);
    let mini: Vec<_> = before
        .iter()
        .filter(|(name, labels, _)| {
            name == "tokenwarden_tokens_total" && labels.iter().any(|l| l == "model=\"gpt-4o-mini")
        })
        .cloned()
        .collect();
    assert!(!mini.is_empty(), "no gpt-4o-mini series:\n{before:?}");
    assert!(
        mini.iter()
            .all(|(_, labels, _)| labels.iter().any(|l| l == "group=\"mini")),
        "{mini:?}"
    );

    let ft = call("ft:gpt-4o-mini-2024-07-18:acme::abc123")
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(ft.unwrap_or(0), 200);
    h.settled().await;
    let after = series(&scrape(&h).await);
    // Every series seen before is still there, with its labels and value.
    for s in &mini {
        assert!(after.contains(s), "{s:?} changed:\n{after:?}");
    }
    // The fine-tuned tokens have a series of their own (outside the program).
    assert!(after.iter().any(|(name, labels, value)| {
        name == "tokenwarden_tokens_total"
            && labels.iter().any(|l| l == "group=\"none")
            && value != "0"
    }));
    // promtool's rule: no two samples with the same name and labels.
    let mut seen = HashSet::new();
    for (name, labels, _) in &after {
        assert!(
            seen.insert((name.clone(), labels.clone())),
            "duplicate series {name}{labels:?}"
        );
    }
}

// ---- 6. The simulator bounds its own work ---------------------------------------

async fn simulator() -> (String, tokio::sync::oneshot::Sender<()>) {
    let sim = tokenwarden::simulator::Simulator::new(
        crate::catalog(),
        tokenwarden::simulator::SimConfig::default(),
    );
    let (addr, stop) = spawn(tokenwarden::simulator::router(sim)).await;
    (format!("http://{addr}/v1"), stop)
}

async fn sim_post(
    client: &reqwest::Client,
    url: &str,
    body: reqwest::Body,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut request = client
        .post(url)
        .bearer_auth("sk-sim-test")
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let r = request.send().await.unwrap_or_else(|e| panic!("{e}"));
    let status = r.status().as_u16();
    let value = r.json().await.unwrap_or(Value::Null);
    (status, value)
}

/// An OpenAI-shaped 400 naming `param`.
fn invalid(status: u16, body: &Value, param: Option<&str>) -> bool {
    status == 400
        && body["error"]["type"] == "invalid_request_error"
        && body["error"]["message"].is_string()
        && body["error"]["param"] == param.map_or(Value::Null, |p| json!(p))
}

#[tokio::test]
async fn the_simulator_refuses_work_past_openais_limits() {
    let (base, _stop) = simulator().await;
    let client = client_from(None);
    let embeddings = format!("{base}/embeddings");
    let inputs = |n: usize| vec!["a"; n];

    // 2,048 inputs per embeddings request, as OpenAI.
    let body = json!({"model": "text-embedding-3-small", "input": inputs(2049)});
    let (status, value) = sim_post(&client, &embeddings, body.to_string().into(), &[]).await;
    assert!(invalid(status, &value, None), "{status} {value}");
    let body = json!({"model": "text-embedding-3-small", "input": inputs(2048), "dimensions": 4});
    let (status, value) = sim_post(&client, &embeddings, body.to_string().into(), &[]).await;
    assert_eq!(status, 200, "{value}");
    assert_eq!(value["data"].as_array().map(Vec::len), Some(2048));
    assert_eq!(
        value["data"][2047]["embedding"].as_array().map(Vec::len),
        Some(4)
    );
    assert_eq!(value["data"][2047]["index"], 2047);
    assert_eq!(value["usage"]["prompt_tokens"], 2048);

    // Dimensions: at least 1, at most the model's own.
    for dimensions in [0u64, 1537, 100_000_000] {
        let body =
            json!({"model": "text-embedding-3-small", "input": "a", "dimensions": dimensions});
        let (status, value) = sim_post(&client, &embeddings, body.to_string().into(), &[]).await;
        assert!(
            invalid(status, &value, Some("dimensions")),
            "{dimensions}: {status} {value}"
        );
    }

    // `n`: at most 128.
    let chat = format!("{base}/chat/completions");
    let body =
        json!({"model": "gpt-4o-mini", "n": 129, "messages": [{"role": "user", "content": "Hi"}]});
    let (status, value) = sim_post(&client, &chat, body.to_string().into(), &[]).await;
    assert!(invalid(status, &value, Some("n")), "{status} {value}");

    // Asked for more output than the model can give: the model's limit.
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]});
    let (status, value) = sim_post(
        &client,
        &chat,
        body.to_string().into(),
        &[("x-sim-output-tokens", "200000")],
    )
    .await;
    assert_eq!(status, 200, "{value}");
    let produced = value["usage"]["completion_tokens"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert_eq!(produced, 16_384, "gpt-4o-mini's max output");
    assert_eq!(value["choices"][0]["finish_reason"], "length");

    // A body past the limit is a 413 in OpenAI's shape, unread.
    let limit = tokenwarden::simulator::MAX_BODY_BYTES;
    let (status, value) = sim_post(&client, &chat, vec![b' '; limit + 1].into(), &[]).await;
    assert_eq!(status, 413, "{value}");
    assert_eq!(value["error"]["type"], "invalid_request_error", "{value}");
}

/// The API's admin routes count wrong admin tokens per address as the
/// sign-in form does: after five, even the right token waits (or a
/// guesser would learn it), while another address is not held up.
#[tokio::test]
async fn repeated_wrong_admin_tokens_lock_the_address_out_of_the_admin_routes() {
    let h = gateway("doors-admin-guesses").await;
    let usage = format!(
        "{}/v1/organization/usage/completions?start_time=0",
        root(&h)
    );
    let guesser = client_from(Some("127.0.0.1"));
    let get = |client: &reqwest::Client, token: &str| {
        client.get(&usage).bearer_auth(token.to_owned()).send()
    };
    let status =
        |r: Result<reqwest::Response, reqwest::Error>| r.map(|r| r.status().as_u16()).unwrap_or(0);
    assert_eq!(status(get(&guesser, ADMIN).await), 200);
    for i in 0..5 {
        let wrong = format!("not-the-admin-token-{i:04}");
        assert_eq!(status(get(&guesser, &wrong).await), 401, "guess {i}");
    }
    let locked = get(&guesser, "not-the-admin-token-9999")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(locked.status().as_u16(), 429);
    assert!(locked.headers().contains_key("retry-after"));
    assert_eq!(
        status(get(&guesser, ADMIN).await),
        429,
        "the right token waits too"
    );
    let metrics = guesser
        .get(format!("{}/metrics", root(&h)))
        .bearer_auth(ADMIN)
        .send()
        .await;
    assert_eq!(status(metrics), 429, "on every admin route");
    let other = client_from(Some("127.0.0.2"));
    assert_eq!(status(get(&other, ADMIN).await), 200);
}
