//! The dashboard: sign-in and sessions over plain HTTP, then the whole page
//! in headless Chromium (tests/sdk/node/dashboard.mjs, playwright-core, with
//! calls by the Node openai SDK), its numbers checked against the ledger.
//! `scripts/test` installs Chromium and the Node packages; without them the
//! browser test fails, it is never skipped.

use std::process::Command;

use serde_json::Value;

use crate::harness::{repo, start_with_server, Harness};

const ADMIN: &str = "admin-token-dashboard-0001";
const KEY: &str = "tw-dash-app-0000000000001";
const PRIVATE_KEY: &str = "tw-dash-private-000000001";

fn config() -> String {
    format!(
        "[[orgs]]\nname = \"acme\"\nsharing = \"selected\"\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{KEY}\"]\n\n[[orgs.projects]]\nname = \"vault\"\nsharing = false\nkeys = [\"{PRIVATE_KEY}\"]\n\n[program.groups.flagship]\ndaily_tokens = 1000\n"
    )
}

async fn dashboard() -> Harness {
    start_with_server(
        "dashboard",
        &config(),
        &format!("admin_token = \"{ADMIN}\"\n"),
    )
    .await
}

fn root(h: &Harness) -> String {
    h.base.trim_end_matches("/v1").to_owned()
}

/// A client that does not follow redirects (to see the sign-in's answer).
fn no_redirects() -> reqwest::Client {
    tokenwarden::gateway::upstream::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
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

#[tokio::test]
async fn sign_in_sets_a_strict_http_only_session_and_a_wrong_token_gets_nothing() {
    let h = dashboard().await;
    let root = root(&h);
    let client = no_redirects();

    let wrong = sign_in(&client, &root, "not-the-admin-token-0000").await;
    assert_eq!(wrong.status().as_u16(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
    let body = wrong.text().await.unwrap_or_default();
    assert!(body.contains("not an admin token") && !body.contains("data-metric"));

    let get = |cookie: &str| {
        client
            .get(format!("{root}/dashboard"))
            .header("cookie", cookie.to_owned())
            .send()
    };
    let forged = get("tw_session=0123456789abcdef").await;
    let forged = forged.map(|r| r.status().as_u16()).unwrap_or(0);
    assert_eq!(forged, 200);
    let page = get("tw_session=0123456789abcdef")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let page = page.text().await.unwrap_or_default();
    assert!(page.contains("id=\"token\"") && !page.contains("data-metric"));
    let events = client
        .get(format!("{root}/dashboard/events"))
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(events.unwrap_or(0), 401);

    let good = sign_in(&client, &root, ADMIN).await;
    assert_eq!(good.status().as_u16(), 303);
    let cookie = good
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains(ADMIN),
        "the cookie holds the token: {cookie}"
    );
    let session = cookie.split(';').next().unwrap_or_default().to_owned();
    let page = get(&session).await.unwrap_or_else(|e| panic!("{e}"));
    let csp = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let page = page.text().await.unwrap_or_default();
    assert!(page.contains("data-metric=\"free-used\"") && !page.contains(ADMIN));

    // Signing out ends the session on the server, not only in the browser.
    let out = client
        .post(format!("{root}/dashboard/logout"))
        .header("cookie", session.clone())
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(out.unwrap_or(0), 303);
    let page = get(&session).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(!page
        .text()
        .await
        .unwrap_or_default()
        .contains("data-metric"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_chromium_matches_the_ledger_and_updates_live() {
    assert!(
        repo("tests/sdk/node/node_modules/playwright-core").exists(),
        "tests/sdk/node/node_modules is missing: run scripts/test, which installs playwright-core"
    );
    let h = dashboard().await;
    let shots = repo("target/artifacts");
    std::fs::create_dir_all(&shots).unwrap_or_else(|e| panic!("{e}"));
    let (root, script, shots_arg) = (
        root(&h),
        repo("tests/sdk/node/dashboard.mjs"),
        shots.clone(),
    );
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(&script)
            .args([&root, KEY, ADMIN])
            .arg(&shots_arg)
            .output()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap_or_else(|e| panic!("node: {e} (run scripts/test, which installs it)"));
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    let phases: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let phase = |name: &str| {
        phases
            .iter()
            .find(|p| p["phase"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} phase in:\n{stdout}"))
    };
    let n = |v: &Value| v.as_u64().unwrap_or(u64::MAX);
    h.settled().await;

    let served = phase("served");
    let live = phase("live");
    let mini = h
        .daily("acme", "mini")
        .await
        .unwrap_or_else(|| panic!("no mini"));
    let flagship = h
        .daily("acme", "flagship")
        .await
        .unwrap_or_else(|| panic!("no flagship"));
    // The ledger now holds the live call too: the page showed it.
    assert_eq!(n(&live["after"]), mini.free_tokens, "{live}");
    assert!(n(&live["before"]) < n(&live["after"]), "{live}");
    assert_eq!(n(&served["free_used_mini"]), n(&live["before"]), "{served}");
    assert_eq!(n(&served["free_used_flagship"]), flagship.free_tokens);
    assert_eq!(n(&served["billed_flagship"]), flagship.billed_tokens);
    assert_eq!(n(&served["cost_flagship"]), flagship.cost_pico);
    assert!(flagship.billed_tokens > 0 && flagship.cost_pico > 0);
    assert_eq!(
        n(&served["free_left_mini"]),
        10_000_000 - n(&served["free_used_mini"])
    );
    // Everything so far came from the sharing project.
    assert_eq!(
        n(&served["shared"]),
        n(&served["free_used_mini"]) + flagship.free_tokens + flagship.billed_tokens
    );
    assert_eq!(n(&served["private"]), 0);
    let alerts = h
        .gateway
        .store
        .alerts(h.today())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!alerts.is_empty(), "the flagship cap of 1000 was passed");
    assert_eq!(n(&served["alerts"]), alerts.len() as u64);
    assert_eq!(n(&served["recent_rows"]), 6);
    assert_eq!(n(&served["charts"]), 1);
    let phone = phase("phone");
    assert!(n(&phone["page_width"]) <= 390, "{phone}");
    for shot in ["dashboard-laptop.png", "dashboard-phone.png"] {
        let size = std::fs::metadata(shots.join(shot)).map_or(0, |m| m.len());
        assert!(size > 10_000, "{shot}: {size} bytes");
    }
    eprintln!(
        "dashboard: live update {} ms after the call returned; screenshots in {}",
        live["ms_after_call"],
        shots.display()
    );
}

/// Small overage shows to the micro-dollar, and each group has the
/// estimated cost of its overage by 00:00 UTC at today's pace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overage_shows_to_the_micro_dollar_with_its_estimate_by_midnight() {
    const KEY: &str = "tw-dashboard-overage-0001";
    const TOKEN: &str = "dashboard-overage-admin-01";
    let config = format!(
        "[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{KEY}\"]\n\n[program.groups.flagship]\ndaily_tokens = 30\n"
    );
    let h = crate::harness::start_with_server(
        "dashboard-overage",
        &config,
        &format!("admin_token = \"{TOKEN}\"\n"),
    )
    .await;
    for _ in 0..3 {
        let r = h
            .post("/chat/completions", KEY)
            .json(&serde_json::json!({"model": "gpt-4o", "max_tokens": 16, "messages": [{"role": "user", "content": "Hello!"}]}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status().as_u16(), 200);
    }
    h.settled().await;
    let records = h.gateway.store.recent(10).await.unwrap_or_default();
    let (input, output): (u64, u64) = records
        .iter()
        .fold((0, 0), |(i, o), r| (i + r.input, o + r.output));
    let billed: u64 = records
        .iter()
        .filter(|r| !r.free)
        .map(|r| r.cost_pico)
        .sum();
    assert!(
        billed > 0 && billed < 10_000_000_000,
        "a fraction of a cent: {billed}"
    );
    let root = h.base.trim_end_matches("/v1").to_owned();
    let page = crate::harness::dashboard_page(&root, TOKEN).await;
    // The cost today: to the micro-dollar, not $0.00.
    let micro = (billed + 500_000) / 1_000_000;
    let shown = format!("${}.{:06}", micro / 1_000_000, micro % 1_000_000);
    let shown = shown.trim_end_matches('0');
    assert!(
        page.contains(&format!(">{shown}</span>")),
        "{shown} not in the page"
    );
    // At noon, today's tokens double by midnight; what passes the cap of
    // 30, at gpt-4o's list prices ($2.50 in, $10.00 out a million).
    let by_midnight = 2 * (input + output);
    let price = (input * 2_500_000 + output * 10_000_000) / (input + output);
    let expected = (by_midnight - 30) * price;
    assert!(
        page.contains(&format!(
            "data-metric=\"overage-estimate\" data-org=\"acme\" data-group=\"flagship\" data-value=\"{expected}\""
        )),
        "no overage estimate of {expected}"
    );
    // The 30-day chart has its axes: tokens (the most on a day today's
    // total) on the left, cost on the right, days below.
    let most = input + output;
    assert!(
        page.contains(&format!("data-axis=\"tokens\">{most}</text>")),
        "no tokens axis up to {most}"
    );
    assert!(page.contains("data-axis=\"cost\">$0</text>"));
    assert!(page.contains(&format!("class=\"c-label end\">{}</text></svg>", h.today())));
}

/// The tables count refused calls and errors apart from answered ones, and
/// OpenAI's usage report leaves the refused out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tables_count_refused_calls_and_errors() {
    const KEY: &str = "tw-dashboard-refusals-01";
    const TOKEN: &str = "dashboard-refusals-admin-1";
    let config = format!(
        "[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"app\"\non_exhausted = \"block\"\nkeys = [\"{KEY}\"]\n\n[program.groups.flagship]\ndaily_tokens = 60\n"
    );
    let h = crate::harness::start_with_server(
        "dashboard-refusals",
        &config,
        &format!("admin_token = \"{TOKEN}\"\n"),
    )
    .await;
    let send = |fault: Option<&'static str>| {
        let mut request = h.post("/chat/completions", KEY).json(&serde_json::json!(
            {"model": "gpt-4o", "max_tokens": 40, "messages": [{"role": "user", "content": "Hello!"}]}
        ));
        if let Some(fault) = fault {
            request = request.header("x-sim-fault", fault);
        }
        async move { request.send().await.map_or(0, |r| r.status().as_u16()) }
    };
    // Each call reserves 49 of the 60; the failed one uses none, the
    // answered one 25.
    assert_eq!(send(Some("status=500")).await, 500);
    assert_eq!(send(None).await, 200);
    assert_eq!(send(None).await, 429);
    assert_eq!(send(None).await, 429);
    h.settled().await;
    let root = h.base.trim_end_matches("/v1").to_owned();
    let page = crate::harness::dashboard_page(&root, TOKEN).await;
    // By project: 2 answered (one an error), 2 refused.
    let row = page
        .split("<tr>")
        .find(|r| r.starts_with("<th scope=\"row\">app</th>"))
        .and_then(|r| r.split("</tr>").next())
        .unwrap_or_else(|| panic!("no row of project app"));
    assert!(
        row.starts_with("<th scope=\"row\">app</th><td>2</td>"),
        "{row}"
    );
    assert!(row.ends_with("<td>2</td><td>1</td>"), "{row}");
    // OpenAI's report counts the answered calls only.
    let report: serde_json::Value = h
        .client
        .get(format!(
            "{}/organization/usage/completions?start_time={}&bucket_width=1d&limit=1",
            h.base,
            h.today().start_unix()
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    let results: Vec<u64> = report["data"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|b| b["results"].as_array().cloned().unwrap_or_default())
        .map(|r| r["num_model_requests"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(results.iter().sum::<u64>(), 2, "{report}");
    assert!(
        results.iter().all(|n| *n > 0),
        "a result of refused calls only: {report}"
    );
}

/// A past day's tables below the live part (`?day=`), and every table as
/// CSV, for a signed-in admin only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_past_day_and_its_tables_as_csv() {
    const KEY: &str = "tw-dashboard-days-key-001";
    const TOKEN: &str = "dashboard-days-admin-0001";
    let config = format!(
        "[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{KEY}\"]\n"
    );
    let h = crate::harness::start_with_server(
        "dashboard-days",
        &config,
        &format!("admin_token = \"{TOKEN}\"\n"),
    )
    .await;
    for model in ["gpt-4o", "gpt-4o-mini", "gpt-4o-mini"] {
        let r = h
            .post("/chat/completions", KEY)
            .json(&serde_json::json!({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Hello!"}]}))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16());
        assert_eq!(r, 200);
    }
    h.settled().await;
    let yesterday = h.today();
    // The next day: the live tables are empty, yesterday's are a pick away.
    h.clock.set(crate::harness::NOON_MS + 86_400_000);
    let root = h.base.trim_end_matches("/v1").to_owned();
    let (client, cookie) = crate::harness::dashboard_session(&root, TOKEN).await;
    let get = |path: String| {
        client
            .get(format!("{root}{path}"))
            .header("cookie", cookie.clone())
            .send()
    };
    let page = get(format!("/dashboard?day={yesterday}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default();
    let days = page.split("id=\"days\"").nth(1).unwrap_or_default();
    assert!(
        days.contains("<th scope=\"row\">gpt-4o-mini</th><td>2</td>"),
        "{days}"
    );
    let csv = get(format!("/dashboard/csv?day={yesterday}&by=model"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(csv.status().as_u16(), 200);
    assert!(csv
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/csv")));
    let text = csv.text().await.unwrap_or_default();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("org,model,requests,input_tokens,output_tokens,free_tokens,billed_tokens,cost_usd,refused,errors")
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(
        rows.iter().any(|r| r.starts_with("acme,gpt-4o-mini,2,")),
        "{text}"
    );
    // Today's CSV has no rows yet; without a session there is none.
    let today = get("/dashboard/csv?by=key".to_owned())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default();
    assert_eq!(today.lines().count(), 1, "{today}");
    let anonymous = h
        .client
        .get(format!("{root}/dashboard/csv?by=model&day={yesterday}"))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16());
    assert_eq!(anonymous, 401);
}
