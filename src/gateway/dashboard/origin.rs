//! The `Origin` check of the dashboard's forms, besides their cookie's
//! `SameSite=Strict`: a browser names the page a `POST` comes from, and one
//! from another site (a sibling subdomain included, which `SameSite`
//! counts as the same site) is refused.
//!
//! A missing `Origin` is allowed: browsers send one with every form `POST`,
//! and a client that omits it (curl, a script) is not a browser that a
//! page could steer. `Origin: null` (a sandboxed frame, a `data:` page) is
//! refused.

use axum::http::{header, HeaderMap};

/// Whether a `POST` with these headers may go on.
pub fn allowed(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Some((scheme, authority)) = origin.to_str().ok().and_then(|o| o.split_once("://")) else {
        return false;
    };
    // The host the client addressed: `Host`, or the one a reverse proxy
    // that rewrites `Host` passes on (a page cannot set either header on a
    // cross-site form, so trusting both lets no other site in).
    ["host", "x-forwarded-host"]
        .iter()
        .filter_map(|name| headers.get(*name)?.to_str().ok())
        .filter_map(|value| value.split(',').next())
        .any(|host| same_authority(scheme, authority, host.trim()))
}

/// `authority` (an origin's `host[:port]`) names the same host and port as
/// `host` (a `Host` header), a scheme's default port written or not.
fn same_authority(scheme: &str, authority: &str, host: &str) -> bool {
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return false,
    };
    let trim = |s: &str| -> String {
        let s = s.to_ascii_lowercase();
        match s.strip_suffix(default_port) {
            Some(bare) => bare.to_owned(),
            None => s,
        }
    };
    !authority.is_empty() && trim(authority) == trim(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn only_the_gateways_own_origin_may_post() {
        let host = ("host", "gw.example:8080");
        assert!(allowed(&headers(&[host])));
        assert!(allowed(&headers(&[
            host,
            ("origin", "http://gw.example:8080")
        ])));
        assert!(allowed(&headers(&[
            host,
            ("origin", "https://GW.example:8080")
        ])));
        for origin in [
            "http://evil.example",
            "http://gw.example",
            "http://gw.example:8081",
            "http://gw.example:8080.evil.example",
            "null",
            "gw.example:8080",
            "file://",
        ] {
            assert!(!allowed(&headers(&[host, ("origin", origin)])), "{origin}");
        }
        assert!(!allowed(&headers(&[("origin", "http://gw.example")])));
    }

    #[test]
    fn default_ports_and_a_proxys_forwarded_host() {
        let origin = ("origin", "https://dash.example");
        assert!(allowed(&headers(&[("host", "dash.example"), origin])));
        assert!(allowed(&headers(&[("host", "dash.example:443"), origin])));
        assert!(!allowed(&headers(&[("host", "dash.example:80"), origin])));
        assert!(allowed(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("x-forwarded-host", "dash.example"),
            origin
        ])));
    }
}
