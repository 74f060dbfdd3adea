//! Errors as the OpenAI API returns them: one enum, one status per variant,
//! one body shape, `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::tokens::request::RequestError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401: no key, or a key that matches no project.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 400: a body the API would refuse.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// 404: a model the catalog does not know, or a model the key may not use.
    #[error("{0}")]
    ModelNotFound(String),
    /// 403: a model the project's `models` list does not name (OpenAI's
    /// answer to a project without access to a model).
    #[error("Project `{project}` does not have access to model `{model}`")]
    NoModelAccess { project: String, model: String },
    /// 403: an admin credential that does not reach this route or object.
    #[error("{0}")]
    PermissionDenied(String),
    /// 404: an object (a project, a key) the admin cannot see or that is not there.
    #[error("{0}")]
    NoSuchObject(String),
    /// 404: a route that does not exist.
    #[error("Invalid URL ({method} {path})")]
    UnknownRoute { method: String, path: String },
    /// 404: a route the project's `forward` rules do not let past the gateway.
    #[error("Invalid URL ({method} {path}): this project does not forward it to the upstream.")]
    NotForwarded { method: String, path: String },
    /// 408: a body that did not arrive in time.
    #[error("The request body took too long to arrive.")]
    RequestTimeout,
    /// 413: a body over the configured limit.
    #[error("The request body is larger than {limit} bytes.")]
    PayloadTooLarge { limit: usize },
    /// 429 `insufficient_quota` / `free_tokens_exhausted`: refused by `block`
    /// (or `clamp`, `downgrade` with nowhere to go).
    #[error("{message}")]
    FreeTokensExhausted {
        message: String,
        /// Seconds to 00:00 UTC: `Retry-After` and `x-free-tokens-reset`.
        retry_after: u64,
        /// The group's cap (`x-free-tokens-limit`).
        limit: u64,
        /// What is left (`x-free-tokens-remaining`).
        remaining: u64,
    },
    /// 502: upstream could not be reached or answered nonsense.
    #[error("{0}")]
    BadGateway(String),
    /// 504: upstream took longer than the configured timeout.
    #[error("The upstream did not answer in time.")]
    GatewayTimeout,
    /// 503: the ledger could not admit or record the call, so it was not
    /// sent upstream (no free token is handed out that the ledger cannot
    /// account for).
    #[error(
        "The gateway's ledger is unavailable, so the call was not sent. Please retry shortly."
    )]
    StoreUnavailable,
    /// 500: the gateway's own fault (the store failed, ...); details are logged, not returned.
    #[error("The server had an error while processing your request.")]
    Internal,
}

impl ApiError {
    /// The ledger failed a read or a write a route needs (logged): 503.
    pub fn store(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "the ledger could not be read or written");
        ApiError::StoreUnavailable
    }

    /// OpenAI's 404 for a URL it does not serve, echoing a short prefix of it.
    pub fn unknown_route(method: &str, path: &str) -> Self {
        ApiError::UnknownRoute {
            method: crate::excerpt(method, 16),
            path: crate::excerpt(path, 128),
        }
    }

    /// The 404 for a path the project's `forward` rules do not open.
    pub fn not_forwarded(method: &str, path: &str) -> Self {
        ApiError::NotForwarded {
            method: crate::excerpt(method, 16),
            path: crate::excerpt(path, 128),
        }
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NoModelAccess { .. } | ApiError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_)
            | ApiError::NoSuchObject(_)
            | ApiError::UnknownRoute { .. }
            | ApiError::NotForwarded { .. } => StatusCode::NOT_FOUND,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::FreeTokensExhausted { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::FreeTokensExhausted { .. } => "insufficient_quota",
            ApiError::BadGateway(_)
            | ApiError::GatewayTimeout
            | ApiError::Internal
            | ApiError::StoreUnavailable => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.as_deref(),
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::Unauthorized(_) => Some("invalid_api_key"),
            ApiError::InvalidRequest { code, .. } => *code,
            ApiError::ModelNotFound(_) | ApiError::NoModelAccess { .. } => Some("model_not_found"),
            ApiError::UnknownRoute { .. } | ApiError::NotForwarded { .. } => Some("unknown_url"),
            ApiError::RequestTimeout => Some("request_timeout"),
            ApiError::PayloadTooLarge { .. } => Some("request_too_large"),
            ApiError::FreeTokensExhausted { .. } => Some("free_tokens_exhausted"),
            ApiError::PermissionDenied(_)
            | ApiError::NoSuchObject(_)
            | ApiError::BadGateway(_)
            | ApiError::GatewayTimeout
            | ApiError::Internal
            | ApiError::StoreUnavailable => None,
        }
    }

    /// The JSON body, for callers that write it themselves (a stream's last event).
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.to_string(),
            "type": self.kind(),
            "param": self.param(),
            "code": self.code(),
        }})
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::UnknownModel(unknown) => ApiError::ModelNotFound(unknown.to_string()),
            RequestError::Invalid {
                message,
                param,
                code,
            } => ApiError::InvalidRequest {
                message,
                param,
                code,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status_code(), axum::Json(self.body())).into_response();
        if let ApiError::StoreUnavailable = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ApiError::FreeTokensExhausted {
            retry_after,
            limit,
            remaining,
            ..
        } = &self
        {
            let headers = response.headers_mut();
            // OpenAI's SDKs retry a 429 by themselves, sleeping `Retry-After`
            // (the seconds to 00:00 UTC): the Node SDK's default client then
            // sleeps for hours. Both SDKs honour `x-should-retry: false`;
            // `Retry-After` stays for clients that want it.
            headers.insert(
                axum::http::HeaderName::from_static("x-should-retry"),
                HeaderValue::from_static("false"),
            );
            for (name, value) in [
                (header::RETRY_AFTER.as_str(), retry_after),
                ("x-free-tokens-limit", limit),
                ("x-free-tokens-remaining", remaining),
                ("x-free-tokens-reset", retry_after),
            ] {
                if let (Ok(name), Ok(value)) = (
                    axum::http::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value.to_string()),
                ) {
                    headers.insert(name, value);
                }
            }
        }
        response
    }
}
