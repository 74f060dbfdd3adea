//! Request paths before routing, and the per-project forward rules.
//!
//! The gateway serves a path only in its one plain spelling: segments of
//! ordinary characters, no empty, `.` or `..` segment, no trailing slash, no
//! percent-encoding, no `;` parameters, no backslash. Any other spelling is a
//! 404 before the router sees it, so a metered or admin route cannot be
//! reached past its handler by writing it another way
//! (`/v1//chat/completions`, `/v1/chat%2Fcompletions`, ...), and no path with
//! a `..` segment is ever sent upstream. The paths OpenAI serves are all
//! plain; a client's SDK never writes another spelling.
//!
//! A forward rule (`forward = ["GET /models/", "POST /moderations"]` in a
//! project) lets that project's calls with that method and a path under
//! that prefix (after `/v1`) go to its upstream unmetered. Only GET, POST and
//! DELETE can be forwarded; rules match whole segments, case-sensitively.

use std::fmt;

/// The longest path the gateway routes (OpenAI's are under 100 bytes).
pub const MAX_PATH_BYTES: usize = 1024;

/// Whether `path` is in its one plain spelling (see the module's comment).
pub fn is_plain(path: &str) -> bool {
    if path == "/" {
        return true;
    }
    if path.len() > MAX_PATH_BYTES || !path.starts_with('/') || path.ends_with('/') {
        return false;
    }
    path[1..]
        .split('/')
        .all(|segment| !matches!(segment, "" | "." | "..") && segment.bytes().all(plain_byte))
}

/// The characters of a plain segment: RFC 3986's unreserved ones, and `:`
/// and `@` (model and object ids such as `ft:gpt-4o-mini:acme::abc`).
fn plain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':' | b'@')
}

/// The methods a forward rule may allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardMethod {
    Get,
    Post,
    Delete,
}

impl ForwardMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardMethod::Get => "GET",
            ForwardMethod::Post => "POST",
            ForwardMethod::Delete => "DELETE",
        }
    }

    fn parse(method: &str) -> Option<Self> {
        match method {
            "GET" => Some(ForwardMethod::Get),
            "POST" => Some(ForwardMethod::Post),
            "DELETE" => Some(ForwardMethod::Delete),
            _ => None,
        }
    }
}

/// One entry of a project's `forward` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardRule {
    pub method: ForwardMethod,
    /// A plain path after `/v1`, such as `/moderations`.
    pub prefix: String,
}

/// Upstream paths that spend money outside the meter or reach objects that
/// every tenant of a shared upstream account shares.
const RISKY: &[&str] = &[
    "files",
    "uploads",
    "batches",
    "fine_tuning",
    "assistants",
    "threads",
    "vector_stores",
    "organization",
    "images",
    "audio",
    "realtime",
    "moderations",
    "evals",
    "containers",
    "videos",
    "models",
    "conversations",
    "chat",
    "responses",
    "completions",
    "embeddings",
];

/// The paths the gateway meters or guards itself under `/v1`: no rule may
/// open them. (`GET /v1/models` is the gateway's too, routed before any
/// rule is read; a rule `GET /models` forwards a model's own page.)
const GATEWAY_OWNED: &[&str] = &[
    "/chat/completions",
    "/responses",
    "/completions",
    "/embeddings",
    "/organization/usage",
    "/organization/costs",
];

impl ForwardRule {
    /// Parse `"METHOD /path"`.
    pub fn parse(text: &str) -> Result<ForwardRule, String> {
        let (method, prefix) = text
            .split_once(' ')
            .ok_or_else(|| format!("{text:?} is not \"METHOD /path\""))?;
        let method = ForwardMethod::parse(method)
            .ok_or_else(|| format!("{method:?}: only GET, POST and DELETE can be forwarded"))?;
        if prefix == "/" || !is_plain(prefix) || prefix.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(format!(
                "{prefix:?} is not a plain lower-case path after /v1 (such as \"/moderations\")"
            ));
        }
        if prefix.starts_with("/v1/") || prefix == "/v1" {
            return Err(format!(
                "{prefix:?}: write the path after /v1 (\"/moderations\", not \"/v1/moderations\")"
            ));
        }
        if GATEWAY_OWNED
            .iter()
            .any(|owned| under(prefix, owned) || under(owned, prefix))
        {
            return Err(format!(
                "{prefix:?} is a path the gateway serves and meters itself"
            ));
        }
        Ok(ForwardRule {
            method,
            prefix: prefix.to_owned(),
        })
    }

    /// Whether a call with `method` to `path` (plain, after `/v1`) is allowed.
    pub fn allows(&self, method: &str, path: &str) -> bool {
        self.method.as_str() == method && under(path, &self.prefix)
    }

    /// Why `check-config` warns of this rule, if it should: a path that
    /// spends money or reaches objects shared by the upstream account.
    pub fn risk(&self) -> Option<&'static str> {
        let first = self.prefix[1..].split('/').next().unwrap_or_default();
        match RISKY.iter().find(|r| **r == first).copied() {
            // Reading a model's page is harmless; deleting one (a
            // fine-tuned model of the whole account) is not.
            Some("models") if self.method != ForwardMethod::Delete => None,
            Some(risk) => Some(risk),
            // Any DELETE reaches objects the account shares.
            None if self.method == ForwardMethod::Delete => Some("a DELETE"),
            None => None,
        }
    }
}

impl fmt::Display for ForwardRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method.as_str(), self.prefix)
    }
}

/// Whether `path` is `prefix` or under it, by whole segments.
fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_the_plain_spelling_of_a_path_is_routed() {
        for plain in [
            "/",
            "/v1/chat/completions",
            "/v1/models/ft:gpt-4o-mini:acme::abc",
            "/dashboard",
            "/healthz",
        ] {
            assert!(is_plain(plain), "{plain}");
        }
        for other in [
            "/v1//chat/completions",
            "/v1/chat/completions/",
            "/v1/./chat/completions",
            "/v1/x/../chat/completions",
            "/v1/chat%2Fcompletions",
            "/v1/chat/completions;x",
            "/v1/organization/usage/completions/",
            "/v1/files/..",
            "/v1\\chat",
            "",
            "*",
            "v1/models",
        ] {
            assert!(!is_plain(other), "{other}");
        }
        assert!(!is_plain(&format!("/v1/{}", "a".repeat(MAX_PATH_BYTES))));
    }

    #[test]
    fn forward_rules_match_whole_segments_and_their_method() {
        let rule = ForwardRule::parse("GET /files").unwrap();
        assert!(rule.allows("GET", "/files"));
        assert!(rule.allows("GET", "/files/file-abc/content"));
        assert!(!rule.allows("GET", "/files2"));
        assert!(!rule.allows("DELETE", "/files/file-abc"));
        assert!(!rule.allows("GET", "/Files"));
        assert_eq!(rule.risk(), Some("files"));
        assert_eq!(ForwardRule::parse("POST /foo/bar").unwrap().risk(), None);
        assert_eq!(ForwardRule::parse("GET /models").unwrap().risk(), None);
        assert_eq!(
            ForwardRule::parse("DELETE /models").unwrap().risk(),
            Some("models")
        );
        assert_eq!(
            ForwardRule::parse("DELETE /foo").unwrap().risk(),
            Some("a DELETE")
        );
    }

    #[test]
    fn forward_rules_that_cannot_be_allowed_are_errors() {
        for bad in [
            "TRACE /files",
            "PUT /files",
            "get /files",
            "GET files",
            "GET /",
            "GET /files/",
            "GET /v1/files",
            "GET /Files",
            "GET /x/../chat/completions",
            "POST /chat/completions",
            "POST /chat",
            "GET /organization",
            "GET /organization/usage/completions",
            "GET",
        ] {
            assert!(ForwardRule::parse(bad).is_err(), "{bad}");
        }
        assert!(ForwardRule::parse("GET /organization/users").is_ok());
        // `GET /v1/models` itself is the gateway's; a model's own page may go upstream.
        assert!(ForwardRule::parse("GET /models").is_ok());
    }
}
