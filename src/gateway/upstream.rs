//! Calls to an upstream: the client's own credentials never leave, the
//! upstream's key goes only to the upstream, hop-by-hop headers are dropped.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use bytes::Bytes;

use super::error::ApiError;
use super::Gateway;
use crate::config::Config;

/// Make ring the process's TLS crypto provider (once; later calls are no-ops).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The shared HTTP client: rustls with the ring provider, a bounded connect
/// time, and the configured limit on a whole call.
pub fn client(config: &Config) -> Result<reqwest::Client, reqwest::Error> {
    install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(config.server.upstream_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
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
    )
}

/// Response headers that are the connection's or no longer true of the body.
fn dropped_response_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "content-length"
            | "content-encoding"
            | "upgrade"
            | "set-cookie"
    )
}

/// The headers of an upstream response worth passing to the client.
pub fn response_headers(upstream: &reqwest::header::HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in upstream {
        if !dropped_response_header(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

/// `base` (an upstream's URL, which may have a path) with the client's path
/// after `/v1` and its query; the same URL as the two concatenated, without
/// parsing the scheme and host again.
fn join(base: &reqwest::Url, path_and_query: &str) -> reqwest::Url {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let mut url = base.clone();
    url.set_path(&format!("{}{path}", base.path().trim_end_matches('/')));
    url.set_query(query);
    url
}

/// Send a call to the project's upstream. `path` is the client's path after `/v1`.
pub async fn send(
    gateway: &Gateway,
    upstream: &str,
    method: Method,
    path_and_query: &str,
    client_headers: &HeaderMap,
    body: Bytes,
) -> Result<reqwest::Response, ApiError> {
    let Some(target) = gateway.config.upstreams.get(upstream) else {
        tracing::error!(
            upstream,
            "a project names an upstream that is not configured"
        );
        return Err(ApiError::Internal);
    };
    let url =
        match gateway.upstream_urls.get(upstream) {
            Some(base) => join(base, path_and_query),
            None => reqwest::Url::parse(&format!("{}{path_and_query}", target.base_url)).map_err(
                |_| ApiError::BadGateway(format!("The upstream '{upstream}' has an invalid URL.")),
            )?,
        };
    let mut request = gateway.client.request(method, url);
    for (name, value) in client_headers {
        if !dropped_request_header(name) {
            request = request.header(name, value);
        }
    }
    if let Some(key) = &target.api_key {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
            .map_err(|_| ApiError::Internal)?;
        value.set_sensitive(true);
        request = request.header(reqwest::header::AUTHORIZATION, value);
    }
    if let Some(org) = &target.organization {
        request = request.header("openai-organization", org);
    }
    if let Some(project) = &target.project {
        request = request.header("openai-project", project);
    }
    request.body(body).send().await.map_err(|e| {
        // reqwest's errors name the URL, never headers, so the key stays out of logs.
        if e.is_timeout() {
            ApiError::GatewayTimeout
        } else {
            tracing::warn!(upstream, error = %e.without_url(), "upstream call failed");
            ApiError::BadGateway(format!("The upstream '{upstream}' could not be reached."))
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn joins_like_concatenation() {
        for (base, path) in [
            ("https://api.openai.com/v1", "/chat/completions"),
            ("http://127.0.0.1:9000", "/chat/completions"),
            ("http://127.0.0.1:9000/", "/models"),
            (
                "http://example.test/openai/v1",
                "/files?purpose=batch&limit=2",
            ),
        ] {
            let joined = join(&reqwest::Url::parse(base).unwrap(), path);
            let concatenated =
                reqwest::Url::parse(&format!("{}{path}", base.trim_end_matches('/'))).unwrap();
            assert_eq!(joined, concatenated, "{base} + {path}");
        }
    }
}
