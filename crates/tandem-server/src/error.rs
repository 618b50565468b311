//! One error type for everything a request can hit, each variant with its HTTP status, OpenAI's
//! error `type` and `code`, and whether a client may retry. Messages never carry keys or prompts.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum GatewayError {
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid JSON body: {0}")]
    BadJson(String),
    #[error("request body is over the limit of {0} bytes")]
    BodyTooLarge(usize),
    #[error("the model `{0}` does not exist; GET /v1/models lists the routes")]
    UnknownRoute(String),
    #[error("missing or wrong API key; send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("the large model's budget for route `{0}` is spent")]
    BudgetExhausted(String),
    #[error("response `{0}` is unknown, too old, or has had its feedback already")]
    UnknownResponse(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    #[error("upstream `{upstream}` timed out after {ms} ms")]
    UpstreamTimeout { upstream: String, ms: u64 },
    #[error("upstream `{upstream}` failed: {reason}")]
    Upstream { upstream: String, reason: String },
    #[error("upstream `{upstream}` returned HTTP {status}: {reason}")]
    UpstreamStatus {
        upstream: String,
        status: u16,
        reason: String,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest(_) | GatewayError::BadJson(_) => StatusCode::BAD_REQUEST,
            GatewayError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::UnknownRoute(_)
            | GatewayError::UnknownResponse(_)
            | GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::Unauthorized => StatusCode::UNAUTHORIZED,
            GatewayError::BudgetExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Upstream { .. } | GatewayError::UpstreamStatus { .. } => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`.
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::BadRequest(_)
            | GatewayError::BadJson(_)
            | GatewayError::BodyTooLarge(_)
            | GatewayError::UnknownRoute(_)
            | GatewayError::UnknownResponse(_)
            | GatewayError::NotFound(_)
            | GatewayError::MethodNotAllowed => "invalid_request_error",
            GatewayError::Unauthorized => "authentication_error",
            GatewayError::BudgetExhausted(_) => "insufficient_quota",
            GatewayError::UpstreamTimeout { .. }
            | GatewayError::Upstream { .. }
            | GatewayError::UpstreamStatus { .. } => "upstream_error",
            GatewayError::Internal(_) => "server_error",
        }
    }

    /// OpenAI's `error.code`.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            GatewayError::UnknownRoute(_) => Some("model_not_found"),
            GatewayError::Unauthorized => Some("invalid_api_key"),
            GatewayError::BudgetExhausted(_) => Some("insufficient_quota"),
            GatewayError::BodyTooLarge(_) => Some("request_too_large"),
            GatewayError::UpstreamTimeout { .. } => Some("upstream_timeout"),
            _ => None,
        }
    }

    /// Whether the same request may succeed if retried.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            GatewayError::UpstreamTimeout { .. }
                | GatewayError::Upstream { .. }
                | GatewayError::UpstreamStatus { .. }
                | GatewayError::BudgetExhausted(_)
        )
    }

    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": null,
                "code": self.code(),
            }
        })
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        metrics::counter!("tandem_errors_total", "type" => self.kind()).increment(1);
        let mut r = (self.status(), axum::Json(self.body())).into_response();
        if self.retryable() {
            r.headers_mut().insert(
                "x-should-retry",
                axum::http::HeaderValue::from_static("true"),
            );
        }
        r
    }
}
