//! `/dashboard`: the allowance for people, live.
//!
//! Signing in posts the admin token once, in a form; the answer sets an
//! HttpOnly, SameSite=Strict cookie holding a random session id (only its
//! hash is kept), so the token never sits in a URL, a page or a script.
//! The forms also check `Origin` ([`origin`]), and sign-in allows a few
//! tries per client address before a lockout ([`throttle`]).
//! The page is rendered on the server, numbers, bars and the 30-day chart
//! (SVG) included, so it reads with scripts off. A small script, embedded in
//! the binary like the stylesheet, listens on `/dashboard/events`
//! (server-sent events): after each commit of the ledger the server sends
//! the page's live part again, rendered the same way. No content of any call
//! is ever shown: requests are metadata only.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sha2::{Digest, Sha256};

use super::Gateway;
use crate::alerts::{clock_time, projected_exhaustion};
use crate::catalog::format_usd;
use crate::day::Day;
use crate::store::{DailyTotal, Record, UsageRow};

const COOKIE: &str = "tw_session";
/// A session lasts this long from sign-in.
const SESSION_MS: i64 = 12 * 3600 * 1000;
/// At most this many sessions at once (the oldest go first).
const MAX_SESSIONS: usize = 256;
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

mod origin;
mod throttle;

/// Signed-in sessions, and the sign-in attempts that may make more.
#[derive(Default)]
pub struct Sessions {
    /// Hash of the session id -> expiry (Unix ms).
    active: Mutex<HashMap<[u8; 32], i64>>,
    /// Attempts per client address, to lock out a guesser.
    sign_ins: throttle::Throttle,
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

impl Sessions {
    /// A new session id (shown once, in the cookie).
    fn create(&self, now_ms: i64) -> String {
        let id = crate::cli::new_key("");
        if let Ok(mut map) = self.active.lock() {
            map.retain(|_, expires| *expires > now_ms);
            if map.len() >= MAX_SESSIONS {
                if let Some(oldest) = map.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k) {
                    map.remove(&oldest);
                }
            }
            map.insert(digest(&id), now_ms + SESSION_MS);
        }
        id
    }

    fn valid(&self, id: &str, now_ms: i64) -> bool {
        let Ok(map) = self.active.lock() else {
            return false;
        };
        map.get(&digest(id))
            .is_some_and(|expires| *expires > now_ms)
    }

    fn end(&self, id: &str) {
        if let Ok(mut map) = self.active.lock() {
            map.remove(&digest(id));
        }
    }
}

/// The live part as last rendered, keyed by the ledger's commit count and
/// the second: any number of viewers cost one render per commit.
#[derive(Default)]
pub struct Cache(Mutex<Option<(u64, i64, Arc<str>)>>);

/// The live part, from the cache when nothing has changed since.
fn live(gateway: &Gateway) -> Arc<str> {
    let commits = *gateway.store.commits().borrow();
    let second = gateway.clock.now_ms().div_euclid(1000);
    if let Ok(cache) = gateway.dashboard_cache.0.lock() {
        if let Some((c, s, html)) = cache.as_ref() {
            if *c == commits && *s == second {
                return html.clone();
            }
        }
    }
    let html: Arc<str> = render_live(gateway).into();
    if let Ok(mut cache) = gateway.dashboard_cache.0.lock() {
        *cache = Some((commits, second, html.clone()));
    }
    html
}

/// The routes under `/dashboard`.
pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/", get(page))
        .route("/dashboard/login", post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/events", get(events))
        .route(
            "/dashboard/assets/app.js",
            get(|| asset(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/dashboard/assets/app.css",
            get(|| asset(APP_CSS, "text/css; charset=utf-8")),
        )
}

async fn asset(text: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        text,
    )
        .into_response()
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn signed_in(gateway: &Gateway, headers: &HeaderMap) -> bool {
    cookie_value(headers, COOKIE)
        .is_some_and(|id| gateway.sessions.valid(id, gateway.clock.now_ms()))
}

/// Headers every dashboard page carries: no caching, no framing, and
/// scripts, styles and connections only from this origin.
fn page_response(status: StatusCode, html: String) -> Response {
    let mut response = (status, html).into_response();
    let h = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn shell(title: &str, body: &str, live: bool) -> String {
    let script = if live {
        "<script src=\"/dashboard/assets/app.js\" defer></script>"
    } else {
        ""
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{}</title><link rel=\"stylesheet\" href=\"/dashboard/assets/app.css\">{script}</head>\n<body>{body}</body></html>\n",
        esc(title)
    )
}

fn login_page(message: Option<&str>, closed: bool) -> String {
    let note = match (closed, message) {
        (true, _) => "<p class=\"error\">The dashboard is closed: this gateway has no admin token (<code>[server] admin_token</code>).</p>".to_owned(),
        (false, Some(m)) => format!("<p class=\"error\" role=\"alert\">{}</p>", esc(m)),
        (false, None) => String::new(),
    };
    let body = format!(
        "<main class=\"login\"><h1>tokenwarden</h1><p>Sign in with the gateway's admin token.</p>{note}\
<form method=\"post\" action=\"/dashboard/login\"><label for=\"token\">Admin token</label>\
<input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required>\
<button type=\"submit\">Sign in</button></form></main>"
    );
    shell("tokenwarden: sign in", &body, false)
}

/// `GET /dashboard`: the page when signed in, else the sign-in form.
async fn page(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if !signed_in(&gateway, &headers) {
        let closed = gateway.config.server.admin_token.is_none();
        return page_response(StatusCode::OK, login_page(None, closed));
    }
    let g = gateway.clone();
    let live = tokio::task::spawn_blocking(move || live(&g))
        .await
        .unwrap_or_else(|_| "<p class=\"error\">The dashboard could not be rendered.</p>".into());
    let body = format!(
        "<header><h1>tokenwarden</h1><span id=\"live-status\" class=\"status\">static</span>\
<form method=\"post\" action=\"/dashboard/logout\"><button type=\"submit\">Sign out</button></form></header>\
<main id=\"live\">{live}</main>"
    );
    page_response(StatusCode::OK, shell("tokenwarden", &body, true))
}

/// One value of an `application/x-www-form-urlencoded` body, decoded.
fn form_value(body: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| super::usage::decode(v))
}

/// The client's address, as the server saw the connection (none when the
/// router runs without the server, as in a unit test: all such callers
/// share one record).
fn peer(request: &axum::extract::Request) -> IpAddr {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}

/// 403 for a form posted from another site.
fn cross_site() -> Response {
    tracing::warn!("dashboard form posted from another origin refused");
    page_response(
        StatusCode::FORBIDDEN,
        login_page(Some("This form was posted from another site."), false),
    )
}

/// 429 while an address is locked out, with `Retry-After`.
fn locked_out(seconds: u64) -> Response {
    let mut response = page_response(
        StatusCode::TOO_MANY_REQUESTS,
        login_page(
            Some(&format!(
                "Too many sign-in attempts from this address. Try again in {seconds} seconds."
            )),
            false,
        ),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// `POST /dashboard/login`: the admin token, compared in constant time,
/// from the gateway's own origin, a few tries per address.
async fn login(State(gateway): State<Arc<Gateway>>, request: axum::extract::Request) -> Response {
    let Some(admin) = gateway.config.server.admin_token.as_ref() else {
        return page_response(StatusCode::FORBIDDEN, login_page(None, true));
    };
    if !origin::allowed(request.headers()) {
        return cross_site();
    }
    let ip = peer(&request);
    if let Err(seconds) = gateway
        .sessions
        .sign_ins
        .attempt(ip, gateway.clock.now_ms())
    {
        return locked_out(seconds);
    }
    let (parts, body) = request.into_parts();
    let bytes = match super::routes::read_body(body, 4096).await {
        Ok(bytes) => bytes,
        Err(e) => return e.into_response(),
    };
    let presented = form_value(&bytes, "token").unwrap_or_default();
    if !super::auth::constant_time_eq(&digest(admin.expose()), &digest(presented.trim())) {
        tracing::warn!(address = %ip, "dashboard sign-in with a wrong token");
        return page_response(
            StatusCode::UNAUTHORIZED,
            login_page(Some("That is not the admin token."), false),
        );
    }
    gateway.sessions.sign_ins.succeeded(ip);
    let id = gateway.sessions.create(gateway.clock.now_ms());
    // Behind a TLS-terminating proxy, the cookie is sent over HTTPS only.
    let secure = parts
        .headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let cookie = format!(
        "{COOKIE}={id}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_MS / 1000,
        if secure { "; Secure" } else { "" }
    );
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/dashboard"));
    response
}

/// `POST /dashboard/logout`.
async fn logout(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if !origin::allowed(&headers) {
        return cross_site();
    }
    if let Some(id) = cookie_value(&headers, COOKIE) {
        gateway.sessions.end(id);
    }
    let mut response = StatusCode::SEE_OTHER.into_response();
    let h = response.headers_mut();
    h.insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "tw_session=; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    h.insert(header::LOCATION, HeaderValue::from_static("/dashboard"));
    response
}

/// How long an idle event stream waits before a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Commits that land this close together make one update (each update
/// re-reads today's totals, so a busy ledger is not read once per commit).
const COALESCE: Duration = Duration::from_millis(500);

/// `GET /dashboard/events`: the live part again after every ledger commit.
async fn events(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if !signed_in(&gateway, &headers) {
        return (StatusCode::UNAUTHORIZED, "sign in at /dashboard first\n").into_response();
    }
    let session = cookie_value(&headers, COOKIE)
        .unwrap_or_default()
        .to_owned();
    let commits = gateway.store.commits();
    let state = (gateway, commits, session, true);
    let stream =
        futures_util::stream::unfold(state, |(gateway, mut commits, session, first)| async move {
            if !first {
                match tokio::time::timeout(KEEP_ALIVE, commits.changed()).await {
                    Err(_) => {
                        let frame = bytes::Bytes::from_static(b": keep-alive\n\n");
                        return Some((
                            Ok::<_, Infallible>(frame),
                            (gateway, commits, session, false),
                        ));
                    }
                    Ok(Err(_)) => return None,
                    Ok(Ok(())) => {
                        tokio::time::sleep(COALESCE).await;
                        commits.borrow_and_update();
                    }
                }
            } else {
                commits.borrow_and_update();
            }
            if !gateway.sessions.valid(&session, gateway.clock.now_ms()) {
                return None;
            }
            let g = gateway.clone();
            let html = tokio::task::spawn_blocking(move || live(&g)).await.ok()?;
            Some((
                Ok(bytes::Bytes::from(update_frame(&html))),
                (gateway, commits, session, false),
            ))
        });
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// One `update` event carrying `html`. Every line of it is a `data:` line of
/// its own, lines ending where an `EventSource` ends them: at CRLF, at a
/// lone CR and at a lone LF. Names from requests (a model, say) reach the
/// page, and a CR in one must not end a field, nor a CR CR the event.
fn update_frame(html: &str) -> String {
    let mut frame = String::with_capacity(html.len() + 64);
    frame.push_str("event: update\n");
    let mut rest = html;
    loop {
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        frame.push_str("data: ");
        frame.push_str(&rest[..end]);
        frame.push('\n');
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        match rest.get(end + skip..) {
            Some(next) if !next.is_empty() => rest = next,
            _ => break,
        }
    }
    frame.push('\n');
    frame
}

// ---- rendering ---------------------------------------------------------------

/// HTML-escaped text.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// 1234567 -> "1,234,567".
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Dollars to the cent for people ("$12.35"); the exact figure is in `title`.
fn dollars(pico: u64) -> String {
    let cents = (u128::from(pico) + 5_000_000_000) / 10_000_000_000;
    format!("${}.{:02}", cents / 100, cents % 100)
}

/// A number with its exact value in `data-value`, for programs and tests.
fn number(metric: &str, org: &str, group: &str, value: u64) -> String {
    format!(
        "<span class=\"num\" data-metric=\"{metric}\" data-org=\"{}\" data-group=\"{}\" data-value=\"{value}\">{}</span>",
        esc(org),
        esc(group),
        grouped(value)
    )
}

fn money(metric: &str, org: &str, group: &str, pico: u64) -> String {
    format!(
        "<span class=\"num\" data-metric=\"{metric}\" data-org=\"{}\" data-group=\"{}\" data-value=\"{pico}\" title=\"{}\">{}</span>",
        esc(org),
        esc(group),
        format_usd(u128::from(pico)),
        dollars(pico)
    )
}

fn duration(secs: u64) -> String {
    format!(
        "{}h {:02}m {:02}s",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Today's per-row usage of one org, merged over the free and billed lanes.
#[derive(Default)]
struct Line {
    requests: u64,
    input: u64,
    output: u64,
    free: u64,
    billed: u64,
    cost: u64,
}

fn lines(
    rows: &[UsageRow],
    org: &str,
    key: impl Fn(&UsageRow) -> Option<String>,
) -> BTreeMap<String, Line> {
    let mut out: BTreeMap<String, Line> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.org == org) {
        let line = out.entry(key(r).unwrap_or_default()).or_default();
        let tokens = r.input_tokens + r.output_tokens;
        line.requests += r.num_model_requests;
        line.input += r.input_tokens;
        line.output += r.output_tokens;
        if r.lane.as_deref() == Some("free") {
            line.free += tokens;
        } else {
            line.billed += tokens;
        }
        line.cost += r.cost_pico;
    }
    out
}

fn table(out: &mut String, caption: &str, first: &str, lines: &BTreeMap<String, Line>) {
    let _ = write!(
        out,
        "<div class=\"scroll\"><table><caption>{}</caption><thead><tr><th scope=\"col\">{}</th>\
<th scope=\"col\">Requests</th><th scope=\"col\">Input</th><th scope=\"col\">Output</th>\
<th scope=\"col\">Free tokens</th><th scope=\"col\">Billed tokens</th><th scope=\"col\">Cost</th></tr></thead><tbody>",
        esc(caption),
        esc(first)
    );
    if lines.is_empty() {
        out.push_str("<tr><td colspan=\"7\" class=\"empty\">No calls today.</td></tr>");
    }
    for (name, l) in lines {
        let _ = write!(
            out,
            "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td title=\"{}\">{}</td></tr>",
            esc(name),
            grouped(l.requests),
            grouped(l.input),
            grouped(l.output),
            grouped(l.free),
            grouped(l.billed),
            format_usd(u128::from(l.cost)),
            dollars(l.cost)
        );
    }
    out.push_str("</tbody></table></div>");
}

/// A bar of `value` out of `max`, as SVG (no inline styles: the page's CSP forbids them).
fn bar(value: u64, max: u64, reserved: u64) -> String {
    let width = |n: u64| {
        if max == 0 {
            0
        } else {
            (u128::from(n.min(max)) * 1000 / u128::from(max)) as u64
        }
    };
    let used = width(value);
    let held = width(value.saturating_add(reserved)).saturating_sub(used);
    format!(
        "<svg class=\"bar\" viewBox=\"0 0 1000 20\" preserveAspectRatio=\"none\" role=\"img\" aria-label=\"{} percent used\">\
<rect class=\"bar-bg\" width=\"1000\" height=\"20\"/><rect class=\"bar-used\" width=\"{used}\" height=\"20\"/>\
<rect class=\"bar-held\" x=\"{used}\" width=\"{held}\" height=\"20\"/></svg>",
        used / 10
    )
}

/// The last 30 days of one org: free and billed tokens stacked, cost as a line.
fn chart(days: &[DailyTotal], org: &str, today: Day) -> String {
    let first = Day(today.0 - 29);
    let mut per_day = vec![(0u64, 0u64, 0u64); 30];
    for d in days
        .iter()
        .filter(|d| d.org == org && d.day >= first && d.day <= today)
    {
        let slot = &mut per_day[(d.day.0 - first.0) as usize];
        slot.0 += d.free_tokens;
        slot.1 += d.billed_tokens;
        slot.2 += d.cost_pico;
    }
    let max_tokens = per_day.iter().map(|d| d.0 + d.1).max().unwrap_or(0).max(1);
    let max_cost = per_day.iter().map(|d| d.2).max().unwrap_or(0).max(1);
    let (w, h, slot) = (600u64, 160u64, 20u64);
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {w} {}\" role=\"img\" aria-label=\"Free and billed tokens and cost, last 30 days\">",
        h + 20
    );
    let mut cost_points = Vec::new();
    for (i, (free, billed, cost)) in per_day.iter().enumerate() {
        let x = i as u64 * slot;
        let free_h = free * h / max_tokens;
        let billed_h = billed * h / max_tokens;
        let day = Day(first.0 + i as i64);
        let _ = write!(
            svg,
            "<g><title>{day}: {} free, {} billed, {}</title>\
<rect class=\"c-free\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{free_h}\"/>\
<rect class=\"c-billed\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{billed_h}\"/></g>",
            grouped(*free),
            grouped(*billed),
            dollars(*cost),
            x + 2,
            h - free_h,
            slot - 4,
            x + 2,
            h - free_h - billed_h,
            slot - 4
        );
        cost_points.push(format!("{},{}", x + slot / 2, h - cost * h / max_cost));
    }
    let _ = write!(
        svg,
        "<polyline class=\"c-cost\" points=\"{}\"/>\
<text x=\"0\" y=\"{}\" class=\"c-label\">{}</text><text x=\"{w}\" y=\"{}\" class=\"c-label end\">{today}</text></svg>",
        cost_points.join(" "),
        h + 16,
        first,
        h + 16
    );
    svg
}

/// The page's live part: everything the server-sent events replace.
pub fn render_live(gateway: &Gateway) -> String {
    let config = &gateway.config;
    let now_ms = gateway.clock.now_ms();
    let today = gateway.today();
    let reset = gateway.seconds_to_reset();
    let start_ms = today.start_unix() * 1000;
    let end_ms = start_ms + 86_400_000;
    let store = &gateway.store;
    let by_project = store
        .usage_rows(start_ms, end_ms, 86_400_000, &["project_id", "lane"])
        .unwrap_or_default();
    let by_key = store
        .usage_rows(start_ms, end_ms, 86_400_000, &["api_key_id", "lane"])
        .unwrap_or_default();
    let by_model = store
        .usage_rows(start_ms, end_ms, 86_400_000, &["model", "lane"])
        .unwrap_or_default();
    let by_sharing = store
        .usage_rows(start_ms, end_ms, 86_400_000, &["sharing"])
        .unwrap_or_default();
    let daily = store.daily(today).unwrap_or_default();
    let history = store
        .daily_range(Day(today.0 - 29), today)
        .unwrap_or_default();
    let recent: Vec<Record> = store.recent(20).unwrap_or_default();
    let alerts = gateway.alerts.today(today);

    let mut out = String::with_capacity(32 * 1024);
    let _ = write!(
        out,
        "<p class=\"when\">{today}, {} UTC. Allowances reset at 00:00 UTC, in \
<span data-reset-at=\"{}\">{}</span>.</p>",
        clock_time(now_ms),
        now_ms + reset as i64 * 1000,
        duration(reset)
    );
    if config.orgs.is_empty() {
        out.push_str("<p>No organizations are configured.</p>");
    }
    for (o, org) in config.orgs.iter().enumerate() {
        let name = &*org.name;
        let eligible = gateway.org_gets_free_tokens(o);
        let _ = write!(
            out,
            "<section class=\"org\" data-org=\"{}\"><h2>{}</h2><p class=\"meta\">tier {} · sharing {} · {}</p>",
            esc(name),
            esc(name),
            org.tier,
            match org.sharing {
                crate::config::OrgSharing::All => "all",
                crate::config::OrgSharing::Selected => "selected",
                crate::config::OrgSharing::Disabled => "disabled",
            },
            if eligible {
                "gets free tokens today"
            } else {
                "no free tokens (not eligible, not sharing, or the program is not running)"
            }
        );
        // Shared against private tokens today, as each call was recorded.
        let projects = lines(&by_project, name, |r| r.project_id.clone());
        let sharing = lines(&by_sharing, name, |r| r.sharing.clone());
        let tokens_of = |kind: &str| sharing.get(kind).map_or(0, |l| l.input + l.output);
        let (shared, private) = (tokens_of("shared"), tokens_of("private"));
        let _ = write!(
            out,
            "<p class=\"meta\">Shared tokens today: {} · private: {}</p>",
            number("shared-tokens", name, "", shared),
            number("private-tokens", name, "", private)
        );
        if org.capture {
            let kept = store.count_captures(name).unwrap_or(0);
            let _ = write!(
                out,
                "<p class=\"meta\">Captured calls kept: {} (retention {} days; <code>tokenwarden export --org {}</code>)</p>",
                number("captured", name, "", kept),
                org.capture_retention_days,
                esc(name)
            );
        }
        out.push_str("<div class=\"groups\">");
        for (g, group) in config.catalog.groups.iter().enumerate() {
            let state = gateway.pool_state(o, g);
            let total = daily
                .iter()
                .find(|d| d.org == name && *d.group == *group.name);
            let billed = total.map_or(0, |t| t.billed_tokens);
            let cost = total.map_or(0, |t| t.cost_pico);
            let gname = &*group.name;
            let projection = match projected_exhaustion(state.used, state.cap, today, now_ms) {
                _ if state.cap == 0 => "no allowance".to_owned(),
                _ if state.used >= state.cap => "used up".to_owned(),
                Some(at) => format!("at {} UTC", clock_time(at)),
                None if state.used == 0 => "no use yet".to_owned(),
                None => "not before the reset".to_owned(),
            };
            let _ = write!(
                out,
                "<article class=\"group\" data-org=\"{}\" data-group=\"{}\"><h3>{}</h3>{}\
<dl><div><dt>Free used</dt><dd>{} of {}</dd></div>\
<div><dt>Free left</dt><dd>{}</dd></div>\
<div><dt>Reserved in flight</dt><dd>{}</dd></div>\
<div><dt>Runs out</dt><dd data-metric=\"projection\" data-org=\"{}\" data-group=\"{}\">{}</dd></div>\
<div><dt>Billed tokens today</dt><dd>{}</dd></div>\
<div><dt>Cost today</dt><dd>{}</dd></div></dl></article>",
                esc(name),
                esc(gname),
                esc(gname),
                bar(state.used, state.cap, state.reserved),
                number("free-used", name, gname, state.used),
                number("free-cap", name, gname, state.cap),
                number("free-left", name, gname, state.left()),
                number("reserved", name, gname, state.reserved),
                esc(name),
                esc(gname),
                esc(&projection),
                number("billed-tokens", name, gname, billed),
                money("cost", name, gname, cost),
            );
        }
        out.push_str("</div>");
        let outside = daily.iter().find(|d| d.org == name && d.group.is_empty());
        if let Some(t) = outside {
            let _ = write!(
                out,
                "<p class=\"meta\">Models outside the program today: {} tokens, {}</p>",
                number("billed-tokens", name, "none", t.billed_tokens),
                money("cost", name, "none", t.cost_pico)
            );
        }
        table(&mut out, "Today by project", "Project", &projects);
        table(
            &mut out,
            "Today by key",
            "Key id",
            &lines(&by_key, name, |r| r.api_key_id.clone()),
        );
        table(
            &mut out,
            "Today by model",
            "Model",
            &lines(&by_model, name, |r| r.model.clone()),
        );
        let findings = gateway.metrics.findings_by_kind(o);
        if !findings.is_empty() {
            out.push_str("<p class=\"meta\">Privacy guard findings since start: ");
            let parts: Vec<String> = findings
                .iter()
                .map(|(kind, n)| format!("{} {}", esc(kind), number("findings", name, kind, *n)))
                .collect();
            out.push_str(&parts.join(" · "));
            out.push_str("</p>");
        }
        let _ = write!(
            out,
            "<figure><figcaption>Last 30 days: <span class=\"key c-free\">free tokens</span> \
<span class=\"key c-billed\">billed tokens</span> <span class=\"key c-cost\">cost</span></figcaption>{}</figure></section>",
            chart(&history, name, today)
        );
    }

    out.push_str("<section><h2>Alerts today</h2>");
    if alerts.is_empty() {
        out.push_str(
            "<p class=\"empty\" data-metric=\"alerts\" data-value=\"0\">None fired today.</p>",
        );
    } else {
        let _ = write!(
            out,
            "<ul class=\"alerts\" data-metric=\"alerts\" data-value=\"{}\">",
            alerts.len()
        );
        for a in &alerts {
            let _ = write!(
                out,
                "<li data-rule=\"{}\"><time>{}</time> {}</li>",
                esc(&a.rule),
                clock_time(a.fired_ms),
                esc(&a.text)
            );
        }
        out.push_str("</ul>");
    }
    out.push_str("</section>");

    out.push_str(
        "<section><h2>Latest requests</h2><div class=\"scroll\"><table class=\"recent\"><thead><tr>\
<th scope=\"col\">#</th><th scope=\"col\">Time</th><th scope=\"col\">Org</th><th scope=\"col\">Project</th>\
<th scope=\"col\">Key id</th><th scope=\"col\">Model</th><th scope=\"col\">Decision</th><th scope=\"col\">Status</th>\
<th scope=\"col\">Input</th><th scope=\"col\">Output</th><th scope=\"col\">Lane</th><th scope=\"col\">Cost</th>\
<th scope=\"col\">Latency</th></tr></thead><tbody>",
    );
    if recent.is_empty() {
        out.push_str("<tr><td colspan=\"13\" class=\"empty\">No calls yet.</td></tr>");
    }
    for r in &recent {
        let model = if r.served_model == r.requested_model {
            esc(&r.served_model)
        } else {
            format!("{} → {}", esc(&r.requested_model), esc(&r.served_model))
        };
        let lane = match (r.state.as_str(), r.free) {
            ("pending", _) => "in flight",
            (_, true) => "free",
            _ if r.decision == "refused" => "-",
            _ => "billed",
        };
        let _ = write!(
            out,
            "<tr data-id=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{model}</td><td>{}</td><td>{}</td>\
<td>{}</td><td>{}{}</td><td>{lane}</td><td>{}</td><td>{} ms</td></tr>",
            r.id,
            r.id,
            clock_time(r.started_ms),
            esc(&r.org),
            esc(&r.project),
            esc(&r.key_id),
            esc(&r.decision),
            if r.state == "pending" { "-".to_owned() } else { r.status.to_string() },
            grouped(r.input),
            grouped(r.output),
            if r.estimated { " (est.)" } else { "" },
            dollars(r.cost_pico),
            r.latency_ms
        );
    }
    out.push_str("</tbody></table></div></section>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_of_an_update_is_a_data_line() {
        assert_eq!(update_frame("a"), "event: update\ndata: a\n\n");
        assert_eq!(
            update_frame("a\r\revent: x\rdata: y\r\n\r\nb\n\nc\n"),
            "event: update\ndata: a\ndata: \ndata: event: x\ndata: data: y\ndata: \ndata: b\ndata: \ndata: c\n\n"
        );
        assert_eq!(update_frame(""), "event: update\ndata: \n\n");
    }

    #[test]
    fn form_values_are_decoded() {
        assert_eq!(
            form_value(b"a=1&token=abc%2Bd+e%26f", "token").as_deref(),
            Some("abc+d e&f")
        );
        assert_eq!(form_value(b"token=%zz", "token").as_deref(), Some("%zz"));
        assert_eq!(form_value(b"other=1", "token"), None);
    }

    #[test]
    fn text_is_escaped_and_numbers_grouped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(grouped(100), "100");
        assert_eq!(dollars(1_234_567_890_123), "$1.23");
        assert_eq!(dollars(5_000_000_000), "$0.01");
    }

    #[test]
    fn sessions_expire_and_end() {
        let sessions = Sessions::default();
        let id = sessions.create(1_000);
        assert!(sessions.valid(&id, 2_000));
        assert!(!sessions.valid("not-a-session", 2_000));
        assert!(!sessions.valid(&id, 1_000 + SESSION_MS));
        sessions.end(&id);
        assert!(!sessions.valid(&id, 2_000));
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; tw_session=xyz; b=2"),
        );
        assert_eq!(cookie_value(&headers, COOKIE), Some("xyz"));
    }
}
