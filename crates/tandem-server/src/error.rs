//! One error type for everything a request can hit, each variant with its HTTP status, OpenAI's
//! error `type`, `code` and `param`, and whether a client may retry. An upstream's own 4xx keeps its
//! meaning (status, type, code, param, `Retry-After`); only what a retry can cure — connection
//! failures, timeouts, 5xx, garbage — is a retryable 502/504. Messages never carry keys or prompts:
//! upstream text is scrubbed ([`crate::scrub`]) before it is put in a variant.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tandem_core::money::micros_to_usd;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum GatewayError {
    #[error("{0}")]
    BadRequest(String),
    /// A bad value in one field of the request, which OpenAI's `error.param` names.
    #[error("{message}")]
    InvalidParam {
        param: &'static str,
        message: String,
    },
    #[error("invalid JSON body: {0}")]
    BadJson(String),
    #[error("request body is over the limit of {0} bytes")]
    BodyTooLarge(usize),
    #[error("the model `{0}` does not exist; GET /v1/models lists the routes")]
    UnknownRoute(String),
    #[error("missing or wrong API key; send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// The route's budget is spent; `retry_after_s` is the time until its window resets (None when
    /// the budget has no window: it never resets by itself).
    #[error("the large model's budget for route `{route}` is spent (or reserved by requests still running)")]
    BudgetExhausted {
        route: String,
        retry_after_s: Option<u64>,
    },
    /// The route's state file was refused at start: its large model stays closed (a budget that
    /// forgot its spend could be passed) until an operator repairs or removes the file.
    #[error("route `{route}` has its large model closed: {reason}")]
    BudgetClosed { route: String, reason: String },
    /// The large call's reservation could not be written to the route's spend journal (disk
    /// full, I/O error, shutting down): the call is not made, since a crash could then forget it
    /// and a restart pass the cap. A retry may succeed once the disk recovers.
    #[error("route `{route}`: the large model's spend could not be recorded on disk, so the call was not made: {reason}")]
    SpendNotDurable { route: String, reason: String },
    /// The request's worst-case cost (its input as sent plus its whole output cap, at the
    /// large model's price) is above the route's whole dollar cap: no window will ever fit it.
    #[error("route `{route}`: this request could cost up to ${:.6}, more than the route's whole budget of ${:.6}; lower `max_tokens` (or `max_completion_tokens`) or shorten the input", micros_to_usd(*.estimate_micros), micros_to_usd(*.cap_micros))]
    OverBudget {
        route: String,
        estimate_micros: u64,
        cap_micros: u64,
    },
    /// Replicas share this route's budget through Redis, and Redis cannot be asked: the route
    /// fails closed (`[server.shared] on_redis_down`), or this replica's fail-open share of
    /// the budget is spent. No large call is made; a retry may succeed once Redis answers.
    #[error("route `{route}`: the shared budget cannot be checked: {reason}")]
    BudgetStoreDown { route: String, reason: String },
    #[error("response `{0}` is unknown, too old, or has had its feedback already")]
    UnknownResponse(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    #[error("upstream `{upstream}` timed out after {ms} ms")]
    UpstreamTimeout { upstream: String, ms: u64 },
    /// The route's `deadline_ms` passed before any upstream answered (retries and fallbacks
    /// included).
    #[error("route `{route}`: no answer within its deadline of {ms} ms")]
    DeadlineExceeded { route: String, ms: u64 },
    /// Connection failure, a cut or malformed answer: the upstream could not be read. `sent`:
    /// the request reached it (false when the connection was never made: it cannot be billed).
    #[error("upstream `{upstream}` failed: {reason}")]
    Upstream {
        upstream: String,
        reason: String,
        sent: bool,
    },
    /// The upstream answered 5xx; `retry_after` is its `Retry-After` header, as sent.
    #[error("upstream `{upstream}` returned HTTP {status}: {reason}")]
    UpstreamStatus {
        upstream: String,
        status: u16,
        reason: String,
        retry_after: Option<String>,
    },
    /// No upstream of the route's `role` group could take the call: every circuit breaker is
    /// open; `retry_after_s` is when the first may close.
    #[error("no upstream of this route's {role} model is available (circuit breakers open)")]
    NoUpstream {
        role: String,
        retry_after_s: Option<u64>,
    },
    /// The upstream refused the request (4xx): its status, OpenAI `type`, `code` and `param` pass
    /// through to the client (boxed: the other variants stay small).
    #[error("upstream `{}`: {}", .0.upstream, .0.message)]
    UpstreamRejected(Box<Rejected>),
    /// More requests in flight than `server.max_in_flight`: shed, to be retried shortly.
    #[error("the gateway is over capacity; retry shortly")]
    Overloaded,
    /// The request's body did not arrive within `server.body_read_timeout_ms`.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// A route's persisted state (file, journal) cannot be read, written or used: the message
    /// names the file and what is wrong with it.
    #[error("{0}")]
    State(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// An upstream's 4xx, as it answered it; `retry_after` is its `Retry-After` header (seconds or an
/// HTTP date, as sent). Every text is scrubbed of keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub upstream: String,
    pub status: u16,
    pub kind: Option<String>,
    pub code: Option<String>,
    pub param: Option<String>,
    pub message: String,
    pub retry_after: Option<String>,
}

/// What a failed response was, put in the response's extensions for the request log line.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorInfo {
    pub kind: String,
    pub code: Option<String>,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest(_)
            | GatewayError::InvalidParam { .. }
            | GatewayError::BadJson(_)
            | GatewayError::OverBudget { .. } => StatusCode::BAD_REQUEST,
            GatewayError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::UnknownRoute(_)
            | GatewayError::UnknownResponse(_)
            | GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::Unauthorized => StatusCode::UNAUTHORIZED,
            GatewayError::BudgetExhausted { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::BudgetClosed { .. }
            | GatewayError::NoUpstream { .. }
            | GatewayError::SpendNotDurable { .. }
            | GatewayError::BudgetStoreDown { .. }
            | GatewayError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::UpstreamTimeout { .. } | GatewayError::DeadlineExceeded { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            GatewayError::Upstream { .. } | GatewayError::UpstreamStatus { .. } => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamRejected(r) => {
                StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST)
            }
            GatewayError::State(_) | GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`.
    pub fn kind(&self) -> &str {
        match self {
            GatewayError::BadRequest(_)
            | GatewayError::InvalidParam { .. }
            | GatewayError::BadJson(_)
            | GatewayError::OverBudget { .. }
            | GatewayError::BodyTooLarge(_)
            | GatewayError::UnknownRoute(_)
            | GatewayError::UnknownResponse(_)
            | GatewayError::NotFound(_)
            | GatewayError::MethodNotAllowed => "invalid_request_error",
            GatewayError::Unauthorized => "authentication_error",
            GatewayError::BudgetExhausted { .. } => "insufficient_quota",
            GatewayError::UpstreamTimeout { .. }
            | GatewayError::DeadlineExceeded { .. }
            | GatewayError::Upstream { .. }
            | GatewayError::UpstreamStatus { .. }
            | GatewayError::NoUpstream { .. } => "upstream_error",
            GatewayError::UpstreamRejected(r) => r.kind.as_deref().unwrap_or(match r.status {
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                429 => "rate_limit_error",
                _ => "invalid_request_error",
            }),
            GatewayError::Internal(_)
            | GatewayError::State(_)
            | GatewayError::BudgetClosed { .. }
            | GatewayError::SpendNotDurable { .. }
            | GatewayError::BudgetStoreDown { .. }
            | GatewayError::Overloaded => "server_error",
            GatewayError::RequestTimeout => "invalid_request_error",
        }
    }

    /// OpenAI's `error.code`.
    pub fn code(&self) -> Option<&str> {
        match self {
            GatewayError::UnknownRoute(_) => Some("model_not_found"),
            GatewayError::Unauthorized => Some("invalid_api_key"),
            GatewayError::BudgetExhausted { .. } => Some("insufficient_quota"),
            GatewayError::OverBudget { .. } => Some("request_over_budget"),
            GatewayError::BudgetClosed { .. } => Some("route_state_refused"),
            GatewayError::SpendNotDurable { .. } => Some("spend_not_durable"),
            GatewayError::BudgetStoreDown { .. } => Some("budget_store_unavailable"),
            GatewayError::Overloaded => Some("overloaded"),
            GatewayError::RequestTimeout => Some("request_timeout"),
            GatewayError::BodyTooLarge(_) => Some("request_too_large"),
            GatewayError::UpstreamTimeout { .. } => Some("upstream_timeout"),
            GatewayError::DeadlineExceeded { .. } => Some("deadline_exceeded"),
            GatewayError::NoUpstream { .. } => Some("upstream_unavailable"),
            GatewayError::UpstreamRejected(r) => r.code.as_deref(),
            _ => None,
        }
    }

    /// OpenAI's `error.param`: the request field at fault, when one is (or the upstream named
    /// one).
    pub fn param(&self) -> Option<&str> {
        match self {
            GatewayError::UpstreamRejected(r) => r.param.as_deref(),
            GatewayError::InvalidParam { param, .. } => Some(*param),
            GatewayError::UnknownResponse(_) => Some("response_id"),
            _ => None,
        }
    }

    /// Whether the same request may succeed if retried (as OpenAI's clients read it: 408, 409,
    /// 429 and 5xx can; other 4xx cannot).
    pub fn retryable(&self) -> bool {
        match self {
            GatewayError::UpstreamTimeout { .. }
            | GatewayError::DeadlineExceeded { .. }
            | GatewayError::Upstream { .. }
            | GatewayError::UpstreamStatus { .. }
            | GatewayError::NoUpstream { .. }
            | GatewayError::SpendNotDurable { .. }
            | GatewayError::BudgetStoreDown { .. }
            | GatewayError::Overloaded
            | GatewayError::RequestTimeout => true,
            GatewayError::BudgetExhausted { retry_after_s, .. } => retry_after_s.is_some(),
            GatewayError::UpstreamRejected(r) => matches!(r.status, 408 | 409 | 429),
            _ => false,
        }
    }

    /// The `Retry-After` value to send, if any.
    pub fn retry_after(&self) -> Option<String> {
        match self {
            GatewayError::BudgetExhausted { retry_after_s, .. } => {
                retry_after_s.map(|s| s.max(1).to_string())
            }
            GatewayError::NoUpstream { retry_after_s, .. } => {
                retry_after_s.map(|s| s.max(1).to_string())
            }
            GatewayError::UpstreamRejected(r) => r.retry_after.clone(),
            GatewayError::UpstreamStatus { retry_after, .. } => retry_after.clone(),
            GatewayError::Overloaded | GatewayError::BudgetStoreDown { .. } => Some("1".into()),
            _ => None,
        }
    }

    /// Whether the budget refused a large call (spent, or — shared through Redis — not
    /// checkable now): a cascade then serves its small model, as when the local cap refuses.
    pub fn is_budget_refusal(&self) -> bool {
        matches!(
            self,
            GatewayError::BudgetExhausted { .. } | GatewayError::BudgetStoreDown { .. }
        )
    }

    /// Whether the upstream could not serve this request for reasons of its own (down, slow,
    /// rate-limited, context too small), so another upstream may: every upstream failure.
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            GatewayError::UpstreamTimeout { .. }
                | GatewayError::Upstream { .. }
                | GatewayError::UpstreamStatus { .. }
                | GatewayError::UpstreamRejected(_)
                | GatewayError::NoUpstream { .. }
        )
    }

    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": self.param(),
                "code": self.code(),
            }
        })
    }

    pub fn info(&self) -> ErrorInfo {
        ErrorInfo {
            kind: self.kind().to_string(),
            code: self.code().map(str::to_string),
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        metrics::counter!("tandem_errors_total", "type" => self.kind().to_string()).increment(1);
        let mut r = (self.status(), axum::Json(self.body())).into_response();
        let h = r.headers_mut();
        h.insert(
            "x-should-retry",
            HeaderValue::from_static(if self.retryable() { "true" } else { "false" }),
        );
        if let Some(v) = self
            .retry_after()
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            h.insert(axum::http::header::RETRY_AFTER, v);
        }
        r.extensions_mut().insert(self.info());
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(status: u16, retry_after: Option<&str>) -> GatewayError {
        GatewayError::UpstreamRejected(Box::new(Rejected {
            upstream: "u".into(),
            status,
            kind: None,
            code: Some("c".into()),
            param: Some("p".into()),
            message: "m".into(),
            retry_after: retry_after.map(str::to_string),
        }))
    }

    #[test]
    fn upstream_4xx_keep_status_and_only_some_retry() {
        for (status, retry) in [
            (400, false),
            (401, false),
            (403, false),
            (404, false),
            (408, true),
            (409, true),
            (422, false),
            (429, true),
        ] {
            let e = rejected(status, None);
            assert_eq!(e.status().as_u16(), status);
            assert_eq!(e.retryable(), retry, "{status}");
            assert_eq!(e.body()["error"]["param"], "p");
            assert_eq!(e.body()["error"]["code"], "c");
        }
        let r = rejected(429, Some("7")).into_response();
        assert_eq!(r.headers()["retry-after"], "7");
        assert_eq!(r.headers()["x-should-retry"], "true");
        assert_eq!(
            r.extensions().get::<ErrorInfo>().unwrap().kind,
            "rate_limit_error"
        );
    }

    #[test]
    fn spend_not_durable_is_a_retryable_openai_503() {
        let r = GatewayError::SpendNotDurable {
            route: "r".into(),
            reason: "state/r.journal: cannot write: No space left on device".into(),
        }
        .into_response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["x-should-retry"], "true");
        let info = r.extensions().get::<ErrorInfo>().unwrap();
        assert_eq!(info.kind, "server_error");
        assert_eq!(info.code.as_deref(), Some("spend_not_durable"));
    }

    #[test]
    fn a_spent_budget_says_when_it_resets() {
        let e = GatewayError::BudgetExhausted {
            route: "r".into(),
            retry_after_s: Some(42),
        };
        let r = e.into_response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "42");
        assert_eq!(r.headers()["x-should-retry"], "true");
        let r = GatewayError::BudgetExhausted {
            route: "r".into(),
            retry_after_s: None,
        }
        .into_response();
        assert!(r.headers().get("retry-after").is_none());
        assert_eq!(r.headers()["x-should-retry"], "false");
    }
}
