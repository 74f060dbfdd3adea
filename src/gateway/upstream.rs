//! Calls to an upstream: the client's own credentials never leave, the
//! upstream's key goes only to the upstream, hop-by-hop headers are dropped,
//! and each org's calls go on connections of their own. The answer's side
//! (headers by an allow-list, bounded bodies) is in `upstream/answer.rs`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::uri::{Authority, Scheme};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_platform_verifier::BuilderVerifierExt;

mod answer;

pub use answer::{Answer, BodyError, BodyStream};

use super::error::ApiError;
use crate::config::Config;

/// Make ring the process's TLS crypto provider (once; later calls are no-ops).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The HTTP client of the alerts' webhook: rustls with the ring provider, a
/// bounded connect time and a limit on a whole call.
pub fn webhook_client(config: &Config) -> Result<reqwest::Client, reqwest::Error> {
    install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(config.server.upstream_timeout)
        .tcp_nodelay(true)
        .build()
}

/// The limit on connecting, the TLS handshake included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream and org; more are closed.
const MAX_IDLE: usize = 1024;

/// hyper-rustls's connector (plain TCP for `http`, rustls for `https`)
/// under the connect limit.
type Connector = TimedConnect<hyper_rustls::HttpsConnector<HttpConnector>>;
/// One pool of keep-alive connections, hyper-util's.
type Pool = hyper_util::client::legacy::Client<Connector, Full<Bytes>>;

/// The upstreams' client: hyper's, a pool of keep-alive connections for
/// each upstream and org, TLS by rustls with the ring provider and the
/// platform's verifier (with an upstream's `ca_file` roots added), a
/// bounded connect time, and the configured limit on a whole call, its body
/// included. Redirects are not followed (the upstream's answer goes to the
/// client as it is, and the upstream's key goes nowhere else), and no proxy
/// from the environment is used.
#[derive(Clone)]
pub struct Client {
    timeout: Duration,
    /// The most of a whole (not streamed) answer that is read.
    max_answer_bytes: usize,
    /// Each upstream, ready to call; `None` when its URL is not one or its
    /// key cannot be a header value.
    targets: Arc<BTreeMap<String, Option<Target>>>,
}

/// One upstream, ready to call.
struct Target {
    /// The URL's scheme and authority, which every call's URI starts with.
    scheme: Scheme,
    authority: Authority,
    /// The URL's path without its trailing `/`; each call's path follows it.
    prefix: String,
    /// The gateway's own headers for it (its key, marked sensitive so it is
    /// never logged, organization and project).
    own_headers: HeaderMap,
    /// A pool per org, by the org's index: a connection that carried one
    /// org's call never carries another org's, so no mistake in reading one
    /// answer can hand it to another tenant.
    pools: Vec<OrgPool>,
}

/// One org's pool of connections to one upstream.
struct OrgPool {
    client: Pool,
    /// Connections this pool has made: a call that failed while none was
    /// made went on a pooled one (see [`send`]'s retry).
    connects: Arc<AtomicU64>,
}

/// The headers an upstream gets from the gateway on every call.
fn upstream_headers(target: &crate::config::Upstream) -> Option<HeaderMap> {
    let mut headers = HeaderMap::new();
    if let Some(key) = &target.api_key {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose())).ok()?;
        value.set_sensitive(true);
        headers.insert(axum::http::header::AUTHORIZATION, value);
    }
    if let Some(org) = &target.organization {
        if let Ok(value) = HeaderValue::from_str(org) {
            headers.insert("openai-organization", value);
        }
    }
    if let Some(project) = &target.project {
        if let Ok(value) = HeaderValue::from_str(project) {
            headers.insert("openai-project", value);
        }
    }
    Some(headers)
}

/// An upstream's base URL as scheme, authority and path prefix: `http` or
/// `https`, no user, no query; `None` when it is not one.
fn base_of(base_url: &str) -> Option<(Scheme, Authority, String)> {
    let uri: Uri = base_url.parse().ok()?;
    let scheme = uri.scheme()?.clone();
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return None;
    }
    let authority = uri.authority()?.clone();
    if authority.as_str().contains('@') || uri.query().is_some() {
        return None;
    }
    Some((
        scheme,
        authority,
        uri.path().trim_end_matches('/').to_owned(),
    ))
}

/// A call's URI: the base URL's, its path followed by the client's.
fn target_uri(target: &Target, path_and_query: &str) -> Option<Uri> {
    let mut path = String::with_capacity(target.prefix.len() + path_and_query.len() + 1);
    path.push_str(&target.prefix);
    if path.is_empty() && !path_and_query.starts_with('/') {
        // A request target is never empty: at least `/`.
        path.push('/');
    }
    path.push_str(path_and_query);
    Uri::builder()
        .scheme(target.scheme.clone())
        .authority(target.authority.clone())
        .path_and_query(path)
        .build()
        .ok()
}

/// A pool on `connector`, counting the connections it makes.
fn pool(connector: &Connector) -> OrgPool {
    let connects = Arc::new(AtomicU64::new(0));
    let connector = TimedConnect {
        inner: connector.inner.clone(),
        connects: Some(connects.clone()),
    };
    OrgPool {
        client: client_on(connector),
        connects,
    }
}

fn client_on(connector: Connector) -> Pool {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(MAX_IDLE)
        // A request that could not be sent on a pooled connection the
        // upstream had closed is sent again, once, on another (one it
        // closed after reading: see `send`).
        .retry_canceled_requests(true)
        .set_host(true)
        .build(connector)
}

/// Build the upstreams' client.
pub fn client(config: &Config) -> Result<Client, rustls::Error> {
    install_crypto_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let connector = |tls: rustls::ClientConfig| {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        TimedConnect {
            inner: hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .wrap_connector(tcp),
            connects: None,
        }
    };
    let platform = connector(
        builder
            .clone()
            .with_platform_verifier()?
            .with_no_client_auth(),
    );
    let mut targets = BTreeMap::new();
    for (name, target) in &config.upstreams {
        // An upstream with a `ca_file` gets a verifier of its own: the
        // platform's roots and that file's.
        let own;
        let tls = if target.extra_roots.is_empty() {
            &platform
        } else {
            let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(
                target.extra_roots.iter().cloned(),
                provider.clone(),
            )?;
            own = connector(
                builder
                    .clone()
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
                    .with_no_client_auth(),
            );
            &own
        };
        let ready = base_of(&target.base_url).and_then(|(scheme, authority, prefix)| {
            Some(Target {
                scheme,
                authority,
                prefix,
                own_headers: upstream_headers(target)?,
                pools: config.orgs.iter().map(|_| pool(tls)).collect(),
            })
        });
        targets.insert(name.clone(), ready);
    }
    Ok(Client {
        timeout: config.server.upstream_timeout,
        max_answer_bytes: config.server.max_answer_bytes,
        targets: Arc::new(targets),
    })
}

/// A connector whose connecting (TCP and TLS) fails past
/// [`CONNECT_TIMEOUT`], counting the connections it starts.
#[derive(Clone)]
struct TimedConnect<C> {
    inner: C,
    connects: Option<Arc<AtomicU64>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> tower_service::Service<Uri> for TimedConnect<C>
where
    C: tower_service::Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        if let Some(connects) = &self.connects {
            connects.fetch_add(1, Ordering::Relaxed);
        }
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err("connecting took longer than 10 s".into()),
            }
        })
    }
}

/// Request headers that are the connection's, the client's credentials, or
/// rewritten by the gateway.
fn dropped_request_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "host"
            | "authorization"
            | "content-length"
            | "connection"
            | "keep-alive"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "accept-encoding"
            | "openai-organization"
            | "openai-project"
            | "cookie"
            | "expect"
    )
}

/// Send a call to the project's upstream, on a connection of `org`'s own
/// pool. `path_and_query` is the client's path after `/v1`, with its query;
/// it follows the upstream URL's path.
pub async fn send(
    client: &Client,
    upstream: &str,
    org: usize,
    method: Method,
    path_and_query: &str,
    client_headers: &HeaderMap,
    body: Bytes,
) -> Result<Answer, ApiError> {
    let Some(ready) = client.targets.get(upstream) else {
        tracing::error!(
            upstream,
            "a project names an upstream that is not configured"
        );
        return Err(ApiError::Internal);
    };
    let target = ready.as_ref().ok_or_else(|| {
        ApiError::BadGateway(format!("The upstream '{upstream}' has an invalid URL."))
    })?;
    let Some(pool) = target.pools.get(org) else {
        tracing::error!(upstream, org, "a call names an org that is not configured");
        return Err(ApiError::Internal);
    };
    let uri = target_uri(target, path_and_query).ok_or_else(|| {
        ApiError::BadGateway(format!("The upstream '{upstream}' has an invalid URL."))
    })?;
    let request = || {
        let mut request = axum::http::Request::new(Full::new(body.clone()));
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri.clone();
        let headers = request.headers_mut();
        headers.reserve(client_headers.len() + target.own_headers.len());
        for (name, value) in client_headers {
            if !dropped_request_header(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        for (name, value) in &target.own_headers {
            headers.insert(name.clone(), value.clone());
        }
        request
    };
    let deadline = tokio::time::Instant::now() + client.timeout;
    let call = async {
        let connects = pool.connects.load(Ordering::Relaxed);
        match pool.client.request(request()).await {
            // The upstream closed the connection without a byte of an
            // answer, and the pool made no connection meanwhile, so the
            // call went on a pooled one: the upstream closed it while idle
            // and never read the request. It goes again, once, on another
            // (hyper-util retries by itself only a request it could not
            // write; a call on a new connection is never sent twice).
            Err(e) if unanswered(&e) && pool.connects.load(Ordering::Relaxed) == connects => {
                tracing::debug!(
                    upstream,
                    "a pooled connection closed before answering; sent again"
                );
                pool.client.request(request()).await
            }
            other => other,
        }
    };
    match tokio::time::timeout_at(deadline, call).await {
        Err(_) => Err(ApiError::GatewayTimeout),
        Ok(Err(e)) => {
            // The errors name neither the URL nor any header, so the key
            // stays out of logs.
            tracing::warn!(upstream, error = %Chain(&e), "upstream call failed");
            Err(ApiError::BadGateway(format!(
                "The upstream '{upstream}' could not be reached."
            )))
        }
        Ok(Ok(answer)) => {
            let (parts, body) = answer.into_parts();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
                deadline,
                max_answer_bytes: client.max_answer_bytes,
            })
        }
    }
}

/// Whether a call failed because its connection closed before an answer
/// came: hyper's incomplete message, or a reset or closed socket.
fn unanswered(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
        {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = e.source();
    }
    false
}

/// An error and its sources, on one line (hyper's top error alone says
/// only "client error (Connect)").
struct Chain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::answer::passed_response_header;
    use super::*;

    fn target(base: &str) -> Option<Target> {
        let (scheme, authority, prefix) = base_of(base)?;
        Some(Target {
            scheme,
            authority,
            prefix,
            own_headers: HeaderMap::new(),
            pools: Vec::new(),
        })
    }

    #[test]
    fn the_path_follows_the_base_urls_like_concatenation() {
        for (base, path, host) in [
            (
                "https://api.openai.com/v1",
                "/chat/completions",
                "api.openai.com",
            ),
            (
                "http://127.0.0.1:9000",
                "/chat/completions",
                "127.0.0.1:9000",
            ),
            ("http://127.0.0.1:9000/", "/models", "127.0.0.1:9000"),
            ("http://127.0.0.1:9000", "", "127.0.0.1:9000"),
            ("http://127.0.0.1:9000", "?limit=2", "127.0.0.1:9000"),
            ("http://[::1]:9000/v1", "/models", "[::1]:9000"),
            (
                "http://example.test/openai/v1",
                "/files?purpose=batch&limit=2",
                "example.test",
            ),
        ] {
            let uri = target_uri(&target(base).unwrap(), path).unwrap();
            let concatenated = format!("{}{path}", base.trim_end_matches('/'));
            let (scheme_host, rest) =
                concatenated.split_at(concatenated.find(host).unwrap() + host.len());
            // A request target starts with `/`, even when the URL has none.
            let rest = if rest.starts_with('/') {
                rest.to_owned()
            } else {
                format!("/{rest}")
            };
            assert_eq!(
                uri.to_string(),
                format!("{scheme_host}{rest}"),
                "{base} + {path}"
            );
            assert_eq!(uri.authority().unwrap().as_str(), host);
        }
        for bad in [
            "not a url",
            "ftp://example.test/v1",
            "http://user:pw@example.test/v1",
            "http://example.test/v1?x=1",
        ] {
            assert!(target(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn answer_headers_pass_by_an_allow_list() {
        for name in [
            "content-type",
            "x-request-id",
            "openai-processing-ms",
            "openai-version",
            "x-ratelimit-limit-requests",
            "x-ratelimit-reset-tokens",
            "retry-after",
        ] {
            assert!(
                passed_response_header(&HeaderName::from_static(name)),
                "{name}"
            );
        }
        for name in [
            "server",
            "set-cookie",
            "x-evil",
            "content-length",
            "transfer-encoding",
            "connection",
            "content-encoding",
            "openai-organization",
            "x-ratelimit",
        ] {
            assert!(
                !passed_response_header(&HeaderName::from_static(name)),
                "{name}"
            );
        }
    }
}
