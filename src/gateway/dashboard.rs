//! `/dashboard`: the allowance for people, live.
//!
//! Signing in posts an admin credential once, in a form (the platform's admin
//! token sees every org, an org admin key its own org only); the answer sets an
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

use std::collections::HashMap;
use std::convert::Infallible;
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

use super::auth::{Actor, Admin};
use super::Gateway;

const COOKIE: &str = "tw_session";
/// A session lasts this long from sign-in.
const SESSION_MS: i64 = 12 * 3600 * 1000;
/// At most this many sessions at once (the oldest go first).
const MAX_SESSIONS: usize = 256;
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

mod batches;
mod history;
mod origin;
mod render;
mod settings;
pub(crate) mod throttle;

use render::{esc, render_live};

/// Signed-in sessions, and the sign-in attempts that may make more.
#[derive(Default)]
pub struct Sessions {
    /// Hash of the session id -> expiry (Unix ms) and who signed in.
    active: Mutex<HashMap<[u8; 32], (i64, Admin, Actor)>>,
    /// Attempts per client address, to lock out a guesser.
    sign_ins: throttle::Throttle,
    /// Wrong admin tokens on the API's admin routes, per client address.
    pub(crate) admin_guesses: throttle::Throttle,
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

impl Sessions {
    /// A new session id (shown once, in the cookie).
    fn create(&self, now_ms: i64, admin: Admin, actor: Actor) -> String {
        let id = super::auth::new_key("");
        if let Ok(mut map) = self.active.lock() {
            map.retain(|_, (expires, _, _)| *expires > now_ms);
            if map.len() >= MAX_SESSIONS {
                if let Some(oldest) = map.iter().min_by_key(|(_, e)| e.0).map(|(k, _)| *k) {
                    map.remove(&oldest);
                }
            }
            map.insert(digest(&id), (now_ms + SESSION_MS, admin, actor));
        }
        id
    }

    /// Who a session signed in as, while it lasts.
    fn valid(&self, id: &str, now_ms: i64) -> Option<Admin> {
        self.who(id, now_ms).map(|(admin, _)| admin)
    }

    /// The same, with who it is for the record of changes.
    fn who(&self, id: &str, now_ms: i64) -> Option<(Admin, Actor)> {
        let map = self.active.lock().ok()?;
        map.get(&digest(id))
            .filter(|(expires, _, _)| *expires > now_ms)
            .map(|(_, admin, actor)| (admin.clone(), actor.clone()))
    }

    fn end(&self, id: &str) {
        if let Ok(mut map) = self.active.lock() {
            map.remove(&digest(id));
        }
    }
}

/// The live part as last rendered for each admin (the platform's, each
/// org's), keyed by the ledger's commit count and the second: any number
/// of viewers cost one render per commit and admin.
#[derive(Default)]
pub struct Cache(Mutex<HashMap<Admin, Rendered>>);

/// A render: the commit count and second it was made at, and its HTML.
type Rendered = (u64, i64, Arc<str>);

/// At most this many admins' renders are cached at once.
const CACHED_VIEWS: usize = 64;

/// The live part as `admin` sees it, from the cache when nothing has
/// changed since; else read from the ledger and rendered on the blocking pool.
async fn live(gateway: &Arc<Gateway>, admin: &Admin) -> Arc<str> {
    let commits = *gateway.store.commits().borrow();
    let second = gateway.clock.now_ms().div_euclid(1000);
    if let Ok(cache) = gateway.dashboard_cache.0.lock() {
        if let Some((c, s, html)) = cache.get(admin) {
            if *c == commits && *s == second {
                return html.clone();
            }
        }
    }
    let data = render::live_data(gateway, admin).await;
    let (g, scope) = (gateway.clone(), admin.clone());
    let html: Arc<str> = tokio::task::spawn_blocking(move || render_live(&g, &data, &scope))
        .await
        .unwrap_or_else(|_| "<p class=\"error\">The dashboard could not be rendered.</p>".into())
        .into();
    if let Ok(mut cache) = gateway.dashboard_cache.0.lock() {
        if cache.len() >= CACHED_VIEWS {
            cache.clear();
        }
        cache.insert(admin.clone(), (commits, second, html.clone()));
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
        .route("/dashboard/csv", get(history::csv))
        .route(
            "/dashboard/settings/sharing",
            post(|state, request| save(state, request, Form::Sharing)),
        )
        .route(
            "/dashboard/settings/project",
            post(|state, request| save(state, request, Form::Project)),
        )
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

/// Who the request's session signed in as, if it has a live one.
fn signed_in(gateway: &Gateway, headers: &HeaderMap) -> Option<Admin> {
    cookie_value(headers, COOKIE).and_then(|id| gateway.sessions.valid(id, gateway.clock.now_ms()))
}

/// Whether no admin credential of any kind is configured.
fn closed(gateway: &Gateway) -> bool {
    let live = gateway.live();
    live.config.server.admin_token.is_none()
        && live.config.server.admin_token_hash.is_none()
        && live.config.orgs.iter().all(|o| o.admin_keys.is_empty())
}

/// Headers every dashboard page carries: no caching, no framing, and
/// scripts, styles and connections only from this origin. The referrer
/// policy is `same-origin`, not `no-referrer`: under `no-referrer` a
/// browser sends `Origin: null` with the page's own form posts, which the
/// forms' Origin check must refuse (a hostile page can send it too); no
/// address leaves for another site either way.
fn page_response(status: StatusCode, html: String) -> Response {
    let mut response = (status, html).into_response();
    let h = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
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
        "<main class=\"login\"><h1>tokenwarden</h1><p>Sign in with the gateway's admin token, or your organization's admin key.</p>{note}\
<form method=\"post\" action=\"/dashboard/login\"><label for=\"token\">Admin token or key</label>\
<input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required>\
<button type=\"submit\">Sign in</button></form></main>"
    );
    shell("tokenwarden: sign in", &body, false)
}

/// `GET /dashboard`: the page when signed in, else the sign-in form.
async fn page(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let Some(admin) = signed_in(&gateway, &headers) else {
        return page_response(StatusCode::OK, login_page(None, closed(&gateway)));
    };
    // `?day=YYYY-MM-DD`: that day's tables below the live part.
    let day = query
        .get("day")
        .and_then(|d| crate::day::Day::parse(d))
        .filter(|d| *d <= gateway.today());
    page_response(
        StatusCode::OK,
        signed_in_page(&gateway, &admin, None, day).await,
    )
}

/// The page of a signed-in admin: the live part, then the settings panel
/// (outside the live part, so an update never resets a form being filled
/// in), with `message` (an error) above.
async fn signed_in_page(
    gateway: &Arc<Gateway>,
    admin: &Admin,
    message: Option<&str>,
    day: Option<crate::day::Day>,
) -> String {
    let live_html = live(gateway, admin).await;
    let history = history::section(gateway, admin, day).await;
    let changes = gateway.changes_of(None).await;
    let panel = settings::render(&gateway.live(), admin, &changes);
    let note = message.map_or(String::new(), |m| {
        format!("<p class=\"error\" role=\"alert\">{}</p>", esc(m))
    });
    let body = format!(
        "<header><h1>tokenwarden</h1><span id=\"live-status\" class=\"status\">static</span>\
<form method=\"post\" action=\"/dashboard/logout\"><button type=\"submit\">Sign out</button></form></header>\
{note}<main id=\"live\">{live_html}</main><div id=\"days\">{history}</div><div id=\"settings\">{panel}</div>"
    );
    shell("tokenwarden", &body, true)
}

/// The two settings forms.
#[derive(Clone, Copy)]
enum Form {
    Sharing,
    Project,
}

/// `POST /dashboard/settings/*`: a change from the settings panel, from
/// the gateway's own origin, by a signed-in admin of that org.
async fn save(
    State(gateway): State<Arc<Gateway>>,
    request: axum::extract::Request,
    form: Form,
) -> Response {
    if !origin::allowed(request.headers()) {
        return cross_site();
    }
    let who = cookie_value(request.headers(), COOKIE)
        .and_then(|id| gateway.sessions.who(id, gateway.clock.now_ms()));
    let Some((admin, actor)) = who else {
        return page_response(StatusCode::UNAUTHORIZED, login_page(None, closed(&gateway)));
    };
    let bytes = match super::routes::read_body(request.into_body(), 16 * 1024).await {
        Ok(bytes) => bytes,
        Err(e) => return e.into_response(),
    };
    let pairs = form_pairs(&bytes);
    let org = pairs
        .iter()
        .find(|(k, _)| k == "org")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let refuse = |status: StatusCode, message: String| {
        let gateway = gateway.clone();
        let admin = admin.clone();
        async move {
            page_response(
                status,
                signed_in_page(&gateway, &admin, Some(&message), None).await,
            )
        }
    };
    if !admin.sees(&org) {
        return refuse(
            StatusCode::FORBIDDEN,
            "That organization is not yours.".into(),
        )
        .await;
    }
    let change = match form {
        Form::Sharing => settings::sharing_change(&pairs),
        Form::Project => settings::project_change(&pairs),
    };
    let change = match change {
        Ok(change) => change,
        Err(message) => return refuse(StatusCode::BAD_REQUEST, message).await,
    };
    let by = format!("{} (dashboard)", actor.0);
    match gateway.change(&org, &by, change).await {
        Ok(_) => {
            let mut response = StatusCode::SEE_OTHER.into_response();
            response.headers_mut().insert(
                header::LOCATION,
                HeaderValue::from_static("/dashboard#settings"),
            );
            response
        }
        Err(super::ChangeError::Invalid(message)) => refuse(StatusCode::BAD_REQUEST, message).await,
        Err(super::ChangeError::Store(e)) => {
            tracing::error!(error = %e, "could not keep a change made on the dashboard");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "The ledger is unavailable; nothing was changed. Try again shortly.".into(),
            )
            .await
        }
    }
}

/// One value of an `application/x-www-form-urlencoded` body, decoded.
fn form_value(body: &[u8], name: &str) -> Option<String> {
    form_pairs(body)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// Every `name=value` of an `application/x-www-form-urlencoded` body, decoded.
fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    std::str::from_utf8(body)
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (super::usage::decode(k), super::usage::decode(v)))
        .collect()
}

/// The client's address, as the server saw the connection (none when the
/// router runs without the server, as in a unit test: all such callers
/// share one record).
pub(crate) fn peer(request: &axum::extract::Request) -> IpAddr {
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
    if closed(&gateway) {
        return page_response(StatusCode::FORBIDDEN, login_page(None, true));
    }
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
    let Some((admin, actor)) = super::auth::admin(&gateway, presented.trim()) else {
        tracing::warn!(address = %ip, "dashboard sign-in with a wrong token");
        return page_response(
            StatusCode::UNAUTHORIZED,
            login_page(Some("That is not an admin token."), false),
        );
    };
    gateway.sessions.sign_ins.succeeded(ip);
    let id = gateway
        .sessions
        .create(gateway.clock.now_ms(), admin, actor);
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
    if signed_in(&gateway, &headers).is_none() {
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
            // The session's admin, read again at each update: a session
            // that ended (signed out, expired) ends its stream.
            let admin = gateway.sessions.valid(&session, gateway.clock.now_ms())?;
            let html = live(&gateway, &admin).await;
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
    fn sessions_expire_and_end() {
        let sessions = Sessions::default();
        let id = sessions.create(1_000, Admin::Org("acme".into()), Actor("k".into()));
        assert_eq!(sessions.valid(&id, 2_000), Some(Admin::Org("acme".into())));
        assert!(sessions.valid("not-a-session", 2_000).is_none());
        assert!(sessions.valid(&id, 1_000 + SESSION_MS).is_none());
        sessions.end(&id);
        assert!(sessions.valid(&id, 2_000).is_none());
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
