//! One structured line per HTTP request (tracing target `tandem::request`, level info), failures
//! included: method, path (never the query), status, latency, the error's OpenAI `type` and
//! `code`, and what the handler noted in the request's [`RequestLog`] slot (route, tier, role,
//! response id, cost). Never a body, a prompt or a key.
//!
//! A streamed response (`text/event-stream`) is logged when its body ends or is dropped (client
//! gone), so the line carries what the stream's end noted — its cost, a mid-stream error — and
//! `latency_ms` is the whole stream's; `complete` says whether the body was sent to its end. A
//! request whose client leaves before the response is logged too, as status 499.

use crate::error::ErrorInfo;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::StreamExt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::Poll;
use std::time::Instant;

/// How many log lines the process's log writer has dropped (its queue full: a stderr slower
/// than the requests), read at each scrape of `/metrics`.
type DroppedLines = Box<dyn Fn() -> u64 + Send + Sync>;
static DROPPED: OnceLock<DroppedLines> = OnceLock::new();

/// Tells `/metrics` where to read the log writer's count of dropped lines
/// (`tandem_log_lines_dropped_total`); the first call counts, later ones are ignored.
pub fn count_dropped_lines(f: impl Fn() -> u64 + Send + Sync + 'static) {
    let _ = DROPPED.set(Box::new(f));
}

/// Publishes the count of dropped log lines, if a writer reports one.
pub(crate) fn publish_dropped_lines() {
    if let Some(f) = DROPPED.get() {
        metrics::counter!("tandem_log_lines_dropped_total").absolute(f());
    }
}

/// The per-request slot handlers fill for the log line; the middleware puts a fresh one in each
/// request's extensions (take it with `Extension<RequestLog>`).
#[derive(Clone, Default)]
pub struct RequestLog(Arc<Mutex<LogFields>>);

/// What the log line says beyond the request and status.
#[derive(Default, Debug, Clone)]
pub struct LogFields {
    /// The response id (`chatcmpl-…`).
    pub id: Option<String>,
    pub route: Option<String>,
    /// The upstream that served.
    pub tier: Option<String>,
    /// `small` or `large`.
    pub role: Option<String>,
    pub cost_usd: Option<f64>,
    pub stream: bool,
    pub usage_estimated: bool,
    /// OpenAI `error.type` of a failure the response's status does not show (mid-stream).
    pub error_kind: Option<String>,
    pub error_code: Option<String>,
}

impl RequestLog {
    /// Updates the fields.
    pub fn set(&self, f: impl FnOnce(&mut LogFields)) {
        // A panic while another holder had the lock leaves fields still worth logging.
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// A copy of the fields as they are now.
    pub fn get(&self) -> LogFields {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The middleware (`axum::middleware::from_fn(log::requests)`), outermost so that every
/// response, whichever layer produced it, gets its line.
pub async fn requests(mut req: Request, next: Next) -> Response {
    // The line filtered out (`RUST_LOG=warn`): none of its preparation either.
    if !tracing::enabled!(target: "tandem::request", tracing::Level::INFO) {
        return next.run(req).await;
    }
    let t0 = Instant::now();
    let slot = RequestLog::default();
    req.extensions_mut().insert(slot.clone());
    // Dropped unfinished when the client goes away before the response (hyper then drops this
    // future): such a request is still logged, as status 499, incomplete.
    let mut pending = Pending(Some(Line {
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        status: None,
        error: None,
        slot,
        t0,
    }));
    let resp = next.run(req).await;
    let Some(mut line) = pending.0.take() else {
        return resp;
    };
    line.status = Some(resp.status());
    line.error = resp.extensions().get::<ErrorInfo>().cloned();
    let streamed = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !streamed {
        line.write(None);
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let mut data = body.into_data_stream();
    // Dropped with the body: a stream cut short (client gone) is still logged, as incomplete.
    let mut at_end = Pending(Some(line));
    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| {
        let next = data.poll_next_unpin(cx);
        if let Poll::Ready(None) = next {
            at_end.finish(true);
        }
        next
    }));
    Response::from_parts(parts, body)
}

struct Line {
    method: Method,
    path: String,
    /// None: the client left before the response.
    status: Option<StatusCode>,
    error: Option<ErrorInfo>,
    slot: RequestLog,
    t0: Instant,
}

impl Line {
    /// `complete`: whether the response was sent to its end (None: not a stream, and sent).
    fn write(self, complete: Option<bool>) {
        let f = self.slot.get();
        // The response's own error first; a stream that failed after its 200 noted it in the slot.
        let (kind, code) = match self.error {
            Some(e) => (Some(e.kind), e.code),
            None => (f.error_kind, f.error_code),
        };
        tracing::info!(
            target: "tandem::request",
            method = %self.method,
            path = %self.path,
            // 499, as nginx logs it: the client closed the connection before the response.
            status = self.status.map_or(499, |s| s.as_u16()),
            // Whole microseconds: the gateway's own work is sub-millisecond.
            latency_ms = self.t0.elapsed().as_micros() as f64 / 1000.0,
            error_type = kind.as_deref(),
            error_code = code.as_deref(),
            route = f.route.as_deref(),
            tier = f.tier.as_deref(),
            role = f.role.as_deref(),
            id = f.id.as_deref(),
            cost_usd = f.cost_usd,
            stream = f.stream,
            usage_estimated = f.usage_estimated,
            complete,
            "request"
        );
    }
}

struct Pending(Option<Line>);

impl Pending {
    fn finish(&mut self, complete: bool) {
        if let Some(line) = self.0.take() {
            line.write(Some(complete));
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.finish(false);
    }
}
