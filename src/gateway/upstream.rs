//! Calls to an upstream: the client's own credentials never leave, the
//! upstream's key goes only to the upstream, hop-by-hop headers are dropped.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use bytes::Bytes;
use rustls_platform_verifier::BuilderVerifierExt;

mod h1;

use super::error::ApiError;
use super::Gateway;
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

/// The upstreams' client: each upstream's origin with its own pool of
/// keep-alive connections ([`h1`]), TLS by rustls with the ring provider and
/// the platform's verifier (with an upstream's `ca_file` roots added), a
/// bounded connect time, and the configured limit on a whole call, its body
/// included. Redirects are not followed (the
/// upstream's answer goes to the client as it is, and the upstream's key
/// goes nowhere else), and no proxy from the environment is used.
#[derive(Clone)]
pub struct Client {
    timeout: Duration,
    /// Each upstream's origin and own headers (its key, organization and
    /// project) written once; `None` when its URL is not one or its key
    /// cannot be a header value.
    targets: Arc<BTreeMap<String, Option<Target>>>,
}

/// One upstream, ready to call.
struct Target {
    origin: Arc<h1::Origin>,
    /// The gateway's own header lines for it, already in HTTP/1.1 form.
    own_headers: Vec<u8>,
}

/// The headers an upstream gets from the gateway on every call, as lines.
fn upstream_headers(target: &crate::config::Upstream) -> Option<Vec<u8>> {
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
    let mut lines = Vec::new();
    for (name, value) in &headers {
        h1::put_header(&mut lines, name, value);
    }
    Some(lines)
}

/// Build the upstreams' client.
pub fn client(config: &Config) -> Result<Client, rustls::Error> {
    install_crypto_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let connector = |mut tls: rustls::ClientConfig| {
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(tls))
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
        let ready = h1::Origin::new(&target.base_url, tls).and_then(|origin| {
            Some(Target {
                origin: Arc::new(origin),
                own_headers: upstream_headers(target)?,
            })
        });
        targets.insert(name.clone(), ready);
    }
    Ok(Client {
        timeout: config.server.upstream_timeout,
        targets: Arc::new(targets),
    })
}

/// Why reading an upstream's body failed.
#[derive(Debug)]
pub enum BodyError {
    /// The call's time limit passed.
    Timeout,
    /// The connection failed or the body was cut.
    Cut(std::io::Error),
}

impl std::error::Error for BodyError {}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Timeout => f.write_str("the upstream call took longer than its time limit"),
            BodyError::Cut(e) => write!(f, "{e}"),
        }
    }
}

/// An upstream's answer: its head, and a body to read before the call's
/// deadline.
pub struct Answer {
    status: axum::http::StatusCode,
    headers: HeaderMap,
    body: h1::Body,
    deadline: tokio::time::Instant,
}

impl Answer {
    pub fn status(&self) -> axum::http::StatusCode {
        self.status
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The headers worth passing to the client, taken out of the answer:
    /// upstream's own map (not copied) less [`DROPPED_RESPONSE_HEADERS`],
    /// with room for the gateway's own.
    pub fn take_headers(&mut self) -> HeaderMap {
        let mut headers = std::mem::take(&mut self.headers);
        for name in DROPPED_RESPONSE_HEADERS {
            headers.remove(name);
        }
        headers.reserve(4);
        headers
    }

    /// The whole body.
    pub async fn bytes(mut self) -> Result<Bytes, BodyError> {
        match tokio::time::timeout_at(self.deadline, self.body.collect()).await {
            Err(_) => Err(BodyError::Timeout),
            Ok(Err(e)) => Err(BodyError::Cut(e)),
            Ok(Ok(bytes)) => Ok(bytes),
        }
    }

    /// The body as a stream of chunks, as they arrive.
    pub fn into_stream(self) -> BodyStream {
        BodyStream {
            body: self.body,
            deadline: Box::pin(tokio::time::sleep_until(self.deadline)),
            ended: false,
        }
    }
}

/// An upstream's body, chunk by chunk; an error ends it.
pub struct BodyStream {
    body: h1::Body,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    ended: bool,
}

impl futures_util::Stream for BodyStream {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        match self.body.poll_chunk(cx) {
            Poll::Ready(Ok(Some(data))) => Poll::Ready(Some(Ok(data))),
            Poll::Ready(Err(e)) => {
                self.ended = true;
                Poll::Ready(Some(Err(BodyError::Cut(e))))
            }
            Poll::Ready(Ok(None)) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    self.ended = true;
                    return Poll::Ready(Some(Err(BodyError::Timeout)));
                }
                Poll::Pending
            }
        }
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

/// Response headers that are the connection's or no longer true of the body.
const DROPPED_RESPONSE_HEADERS: [HeaderName; 7] = [
    axum::http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    axum::http::header::TRANSFER_ENCODING,
    axum::http::header::CONTENT_LENGTH,
    axum::http::header::CONTENT_ENCODING,
    axum::http::header::UPGRADE,
    axum::http::header::SET_COOKIE,
];

/// Send a call to the project's upstream. `path_and_query` is the client's
/// path after `/v1`, with its query; it follows the upstream URL's path.
pub async fn send(
    gateway: &Gateway,
    upstream: &str,
    method: Method,
    path_and_query: &str,
    client_headers: &HeaderMap,
    body: Bytes,
) -> Result<Answer, ApiError> {
    let Some(ready) = gateway.client.targets.get(upstream) else {
        tracing::error!(
            upstream,
            "a project names an upstream that is not configured"
        );
        return Err(ApiError::Internal);
    };
    let target = ready.as_ref().ok_or_else(|| {
        ApiError::BadGateway(format!("The upstream '{upstream}' has an invalid URL."))
    })?;
    let mut head = target.origin.start_head(method.as_str(), path_and_query);
    for (name, value) in client_headers {
        if !dropped_request_header(name) {
            h1::put_header(&mut head, name, value);
        }
    }
    head.extend_from_slice(&target.own_headers);
    let method_has_body = matches!(method, Method::POST | Method::PUT | Method::PATCH);
    h1::end_head(&mut head, body.len(), method_has_body);
    let deadline = tokio::time::Instant::now() + gateway.client.timeout;
    let call = target.origin.call(head, body, method == Method::HEAD);
    match tokio::time::timeout_at(deadline, call).await {
        Err(_) => Err(ApiError::GatewayTimeout),
        Ok(Err(e)) => {
            // The errors name neither the URL nor any header, so the key
            // stays out of logs.
            tracing::warn!(upstream, error = %e, "upstream call failed");
            Err(ApiError::BadGateway(format!(
                "The upstream '{upstream}' could not be reached."
            )))
        }
        Ok(Ok(answer)) => Ok(Answer {
            status: answer.status,
            headers: answer.headers,
            body: answer.body,
            deadline,
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn origin(base: &str) -> Option<h1::Origin> {
        install_crypto_provider();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_platform_verifier()
            .unwrap()
            .with_no_client_auth();
        h1::Origin::new(base, &tokio_rustls::TlsConnector::from(Arc::new(tls)))
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
            let head = origin(base).unwrap().start_head("GET", path);
            let concatenated = format!("{}{path}", base.trim_end_matches('/'));
            let target = concatenated.split_once(host).unwrap().1;
            // A request target starts with `/`, even when the URL has none.
            let target = if target.starts_with('/') {
                target.to_owned()
            } else {
                format!("/{target}")
            };
            assert_eq!(
                String::from_utf8(head).unwrap(),
                format!("GET {target} HTTP/1.1\r\nhost: {host}\r\n"),
                "{base} + {path}"
            );
        }
        for bad in [
            "not a url",
            "ftp://example.test/v1",
            "http://user:pw@example.test/v1",
            "http://example.test/v1?x=1",
        ] {
            assert!(origin(bad).is_none(), "{bad}");
        }
    }
}
