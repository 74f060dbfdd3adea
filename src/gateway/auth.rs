//! Client keys: stored only as SHA-256 hashes, compared in constant time.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::{Gateway, Live};
use crate::config::Config;

/// Who is calling: the project a key belongs to, in the configuration the
/// key was found in (the call keeps it to its end).
#[derive(Clone)]
pub struct Caller {
    /// Index of the org in the configuration.
    pub org: usize,
    /// Index of the project in its org.
    pub project: usize,
    /// A non-secret id for records and logs: the first 12 hex digits of the key's hash.
    pub key_id: std::sync::Arc<str>,
    /// The configuration of the call.
    pub live: Arc<Live>,
    /// A batch's line, not a client's call: the batch's terms.
    pub batch: Option<Arc<BatchTerms>>,
}

/// How a batch's lines spend (its project's `batch_spend`).
#[derive(Clone, Debug)]
pub struct BatchTerms {
    /// Only free tokens beyond `reserve_percent` of the allowance: a line
    /// that does not fit is refused (and waits), whatever the policy.
    pub free_only: bool,
    pub reserve_percent: u8,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("org", &self.org)
            .field("project", &self.project)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Caller {
    /// The caller's org name and project id (what the ledger's files and
    /// batches are kept under).
    pub fn owner(&self) -> Result<(String, String), ApiError> {
        let (org, project) = self.org_project().ok_or(ApiError::Internal)?;
        Ok((org.name.to_string(), project.id.to_string()))
    }

    /// Whether no other active project (of any org) calls the caller's
    /// project's upstream: then what the upstream keeps under its key
    /// (stored responses, chat completions) is this project's alone.
    pub fn alone_on_upstream(&self) -> bool {
        let Some((_, mine)) = self.org_project() else {
            return false;
        };
        self.live
            .config
            .orgs
            .iter()
            .flat_map(|o| &o.projects)
            .filter(|p| p.active() && p.upstream == mine.upstream)
            .count()
            == 1
    }

    /// The caller's org and project.
    pub fn org_project(&self) -> Option<(&crate::config::Org, &crate::config::Project)> {
        let org = self.live.config.orgs.get(self.org)?;
        Some((org, org.projects.get(self.project)?))
    }
}

/// A client key's holder, as the key table keeps it.
#[derive(Clone, Debug)]
struct Holder {
    org: usize,
    project: usize,
    key_id: Arc<str>,
}

pub struct KeyTable {
    /// Client key hash -> holder; the keys themselves are not kept.
    by_hash: crate::FastMap<[u8; 32], Holder>,
    /// Org admin key hash -> the org's name and who the key is, for the
    /// record of changes (a table of their own, so a client key is never an
    /// admin's, nor the other way round).
    admins: crate::FastMap<[u8; 32], (Arc<str>, Arc<str>)>,
}

/// Who holds an admin credential.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Admin {
    /// The platform's `[server] admin_token`: every org.
    Platform,
    /// An org admin key: that org only, whatever a request asks for.
    Org(Arc<str>),
}

impl Admin {
    /// Whether this admin may see and change org `org`.
    pub fn sees(&self, org: &str) -> bool {
        match self {
            Admin::Platform => true,
            Admin::Org(own) => **own == *org,
        }
    }
}

/// A fresh client key: not guessable, shown once.
pub fn new_key(prefix: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(std::process::id().to_le_bytes());
    hasher.update(format!("{:?}", std::time::SystemTime::now()).as_bytes());
    hasher.update(format!("{:p}", &hasher).as_bytes());
    if let Ok(bytes) = std::fs::read("/proc/sys/kernel/random/uuid") {
        hasher.update(bytes);
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

pub(crate) fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A key's id, for records, logs and the admin API: the first 12 hex digits
/// of its hash (which tell nothing of the key).
pub fn key_id(digest: &[u8; 32]) -> String {
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// The hashes of configured keys not deleted, then of keys made at runtime.
fn live_hashes<'a>(
    configured: &'a [crate::config::Secret],
    deleted: &'a [Arc<str>],
    runtime: &'a [crate::config::RuntimeKey],
) -> impl Iterator<Item = [u8; 32]> + 'a {
    let configured = configured
        .iter()
        .map(|k| hash(k.expose()))
        .filter(|d| !deleted.iter().any(|id| **id == *key_id(d)));
    let runtime = runtime.iter().filter_map(|k| parse_hash(&k.hash));
    configured.chain(runtime)
}

/// A SHA-256 written as 64 hex digits.
pub fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    let mut digest = [0u8; 32];
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    for (i, out) in digest.iter_mut().enumerate() {
        let pair = std::str::from_utf8(bytes.get(2 * i..2 * i + 2)?).ok()?;
        *out = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(digest)
}

/// A SHA-256 as 64 hex digits.
pub fn hex_hash(value: &str) -> String {
    hash(value).iter().map(|b| format!("{b:02x}")).collect()
}

/// A new key made at runtime (`prefix` and 40 hex digits), and what is
/// kept of it: its hash, id, name and ends.
pub fn make_key(
    prefix: &str,
    name: &str,
    now_s: i64,
    service_account: Option<String>,
) -> (String, crate::config::RuntimeKey) {
    let value = new_key(prefix);
    let tail = value.get(value.len().saturating_sub(4)..).unwrap_or("");
    let kept = crate::config::RuntimeKey {
        id: key_id(&hash(&value)).into(),
        name: name.to_owned(),
        hash: hex_hash(&value),
        redacted: format!("{}...{tail}", value.get(..5).unwrap_or("")),
        created_at: now_s,
        service_account,
    };
    (value, kept)
}

/// Equal in time that depends only on the length.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl KeyTable {
    /// Every key that works: configured ones not deleted, and those made
    /// through the admin API; none of a retired org or an archived or
    /// retired project.
    pub fn new(config: &Config) -> Self {
        let mut by_hash = crate::FastMap::default();
        let mut admins = crate::FastMap::default();
        for (org, o) in config.orgs.iter().enumerate().filter(|(_, o)| !o.retired) {
            for digest in live_hashes(&o.admin_keys, &o.deleted_admin_keys, &o.runtime_admin_keys) {
                let id = key_id(&digest);
                let actor = match o.runtime_admin_keys.iter().find(|k| *k.id == *id) {
                    Some(k) => format!("admin key {id} ({})", k.name),
                    None => format!("admin key {id}"),
                };
                admins.insert(digest, (o.name.clone(), actor.into()));
            }
            for (project, p) in o.projects.iter().enumerate().filter(|(_, p)| p.active()) {
                for digest in live_hashes(&p.keys, &p.deleted_keys, &p.runtime_keys) {
                    by_hash.insert(
                        digest,
                        Holder {
                            org,
                            project,
                            key_id: key_id(&digest).into(),
                        },
                    );
                }
            }
        }
        KeyTable { by_hash, admins }
    }

    /// The org whose admin key `presented` is, compared as [`KeyTable::find`] does.
    fn find_admin(&self, presented: &str) -> Option<&(Arc<str>, Arc<str>)> {
        let digest = hash(presented);
        self.admins
            .get_key_value(&digest)
            .filter(|(stored, _)| constant_time_eq(stored.as_slice(), digest.as_slice()))
            .map(|(_, org)| org)
    }

    /// The caller a presented key belongs to. The lookup is by hash (which
    /// reveals nothing about stored keys), then the hashes are compared in
    /// constant time.
    fn find(&self, presented: &str) -> Option<&Holder> {
        let digest = hash(presented);
        self.by_hash
            .get_key_value(&digest)
            .filter(|(stored, _)| constant_time_eq(stored.as_slice(), digest.as_slice()))
            .map(|(_, holder)| holder)
    }
}

/// The token of an `Authorization` header's value `Bearer TOKEN`. The
/// scheme is matched in any case (RFC 9110, 11.1: `bearer`, `BEARER`),
/// because clients and proxies that lower-case it are common.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The token of a request's `Authorization: Bearer TOKEN` header, if there is one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
}

/// The caller a request's `Authorization: Bearer KEY` names, or OpenAI's 401.
pub fn caller(gateway: &Gateway, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let Some(presented) = bearer(headers) else {
        return Err(ApiError::Unauthorized(
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        ));
    };
    let live = gateway.live();
    let Holder {
        org,
        project,
        ref key_id,
    } = *live
        .keys
        .find(presented)
        .ok_or(ApiError::Unauthorized("Incorrect API key provided."))?;
    let key_id = key_id.clone();
    Ok(Caller {
        org,
        project,
        key_id,
        live,
        batch: None,
    })
}

/// Middleware: a valid `Authorization: Bearer KEY` or OpenAI's 401.
pub async fn require_key(
    State(gateway): State<Arc<Gateway>>,
    mut request: Request,
    next: Next,
) -> Response {
    match caller(&gateway, request.headers()) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        // An admin route that does not exist, asked for with an admin
        // credential: OpenAI's 404, not a 401 that would send the admin
        // looking for a wrong key.
        Err(_)
            if request.uri().path().starts_with("/v1/organization/")
                && admin(&gateway, bearer(request.headers()).unwrap_or_default()).is_some() =>
        {
            ApiError::unknown_route(request.method().as_str(), request.uri().path()).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Who made a change: "admin token", or an org admin key's id (and name).
#[derive(Clone, Debug)]
pub struct Actor(pub Arc<str>);

/// The admin a presented credential names: the platform's admin token
/// (compared in constant time) or an org admin key; and who it is.
pub fn admin(gateway: &Gateway, presented: &str) -> Option<(Admin, Actor)> {
    let live = gateway.live();
    let server = &live.config.server;
    let presented_hash = hash(presented);
    let platform = server
        .admin_token
        .as_ref()
        .is_some_and(|token| constant_time_eq(&hash(token.expose()), &presented_hash))
        || server
            .admin_token_hash
            .is_some_and(|kept| constant_time_eq(&kept, &presented_hash));
    if platform {
        return Some((Admin::Platform, Actor("admin token".into())));
    }
    let (org, actor) = live.keys.find_admin(presented)?;
    Some((Admin::Org(org.clone()), Actor(actor.clone())))
}

/// Middleware for the admin routes: `Authorization: Bearer TOKEN`, the
/// platform's admin token or an org admin key; the [`Admin`] goes in the
/// request's extensions. With neither configured they are closed.
pub async fn require_admin(
    State(gateway): State<Arc<Gateway>>,
    mut request: Request,
    next: Next,
) -> Response {
    // Wrong tokens are counted per client address, as the dashboard's
    // sign-in counts them: after a few, the address is locked out for a
    // while (the right token included, or a guesser would learn it).
    let ip = super::dashboard::peer(&request);
    let guesses = &gateway.sessions.admin_guesses;
    let now_ms = gateway.clock.now_ms();
    if let Some(seconds) = guesses.locked(ip, now_ms) {
        return locked_out(seconds);
    }
    let presented = bearer(request.headers()).unwrap_or_default();
    if let Some((admin, actor)) = admin(&gateway, presented) {
        request.extensions_mut().insert(admin);
        request.extensions_mut().insert(actor);
        return next.run(request).await;
    }
    if let Err(seconds) = guesses.attempt(ip, now_ms) {
        return locked_out(seconds);
    }
    ApiError::Unauthorized(
        "This route needs an admin credential: the admin token (server.admin_token) or an org admin key.",
    )
    .into_response()
}

/// Middleware after [`require_admin`] on the platform's own routes
/// (`/metrics`): an org admin key gets 403.
pub async fn require_platform(request: Request, next: Next) -> Response {
    match request.extensions().get::<Admin>() {
        Some(Admin::Platform) => next.run(request).await,
        _ => ApiError::PermissionDenied(
            "This route is the platform's: it needs the admin token (server.admin_token), not an org admin key.".into(),
        )
        .into_response(),
    }
}

/// 429 with `Retry-After` for an address locked out after wrong tokens.
fn locked_out(seconds: u64) -> Response {
    let mut response = ApiError::InvalidRequest {
        message: format!(
            "Too many wrong admin tokens from this address; try again in {seconds} seconds."
        ),
        param: None,
        code: Some("rate_limit_exceeded"),
    }
    .into_response();
    *response.status_mut() = axum::http::StatusCode::TOO_MANY_REQUESTS;
    if let Ok(value) = axum::http::HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_matches_in_any_case() {
        for value in ["Bearer k1", "bearer k1", "BEARER k1", "BeArEr  k1 "] {
            assert_eq!(bearer_token(value), Some("k1"), "{value}");
        }
        for value in [
            "Basic k1",
            "Bearerk1",
            "Bearer ",
            "Bearer",
            "k1",
            "Bearer\tk1",
        ] {
            assert_eq!(bearer_token(value), None, "{value}");
        }
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
