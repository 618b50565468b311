//! The HTTP surface, kept thin: each handler checks the key, reads and parses the body, calls the
//! [`Gateway`] and writes OpenAI's shapes. Order of work on a request, in one place (the layers
//! are stacked in [`router`] in this order, outermost first):
//!
//! 1. the accept loop ([`crate::listen`]), before any layer: at most `server.max_connections`
//!    open connections (past it, 503 `overloaded` and the connection closed), and a connection
//!    whose request headers take longer than `server.header_read_timeout_ms` is closed;
//! 2. log ([`log::requests`]): a fresh [`log::RequestLog`] slot in the request's extensions; one
//!    line per request once the response is out (a stream's, when its body ends or is dropped);
//! 3. load shedding ([`layers::InFlightLayer`]): past `server.max_in_flight` requests at once
//!    (a stream counts until its body ends), 503 `overloaded` with `Retry-After: 1` at once,
//!    never a queue;
//! 4. CORS (tower-http `CorsLayer`, only with `[server.cors]`): a preflight `OPTIONS` is answered
//!    here, before authentication (browsers send no key with it); other responses get
//!    `access-control-allow-origin` and `-expose-headers` (the `x-tandem-*` headers,
//!    `retry-after`, `x-should-retry`). Any request header a preflight names is allowed: the key
//!    travels in `Authorization`, never in cookies, so this widens nothing, and the OpenAI JS SDK
//!    sends `x-stainless-*` headers whose set changes with its versions. Without `[server.cors]`
//!    there are no CORS headers and `OPTIONS` is a method like any other: 405 in OpenAI's shape
//!    with an `Allow` header — a browser only preflights a cross-origin call, which without CORS
//!    fails whatever the answer;
//! 5. request decompression (tower-http, `Content-Encoding: gzip | deflate | br | zstd`, matched
//!    case-insensitively by [`layers::CodingLayer`]): lazy, so nothing is inflated before authentication, and the body limit
//!    below counts decompressed bytes. An unknown coding is a 415 in OpenAI's shape (with
//!    `Accept-Encoding`); a body that does not decompress is a 400 when it is read;
//! 6. authentication (`Authorization: Bearer <key>`, scheme case-insensitive, when
//!    `server.api_keys_env` is set) — before the body is read, so an unauthenticated client
//!    cannot make the gateway buffer anything;
//! 7. the body, whole within `server.body_read_timeout_ms` of the first attempt to read it (408
//!    past it: a client that trickles its body cannot hold a request open) and within
//!    `server.max_body_bytes` (413), then JSON parsing into the request shape;
//! 8. the pipeline ([`Gateway::chat`]): route, decision, budget, upstream calls, learning;
//! 9. response: JSON or an SSE stream, with `x-tandem-*` headers; the gateway's own overhead
//!    (total time less upstream time) goes to the `tandem_overhead_seconds` histogram.
//!
//! Every error, including unknown paths and wrong methods, is OpenAI-shaped.

use crate::error::GatewayError;
use crate::gateway::{sse_whole, Event, Gateway, Reply, StreamReply};
use crate::openai::{ChatRequest, Feedback, Force, TandemInfo};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use std::sync::{Arc, OnceLock};
use std::time::Instant;
// For the layers (router, cors_layer, content_encoding) and GET /v1/models/{id}.
use crate::config::CorsConfig;
use axum::extract::{rejection::PathRejection, Path};
use axum::http::{HeaderName, Method};
use std::time::Duration;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

pub mod layers;
pub mod log;

/// What the handlers and layers need.
#[derive(Clone)]
pub struct AppState {
    pub gateway: Arc<Gateway>,
    /// `server.max_body_bytes`: the most a request body may hold, decompressed.
    pub max_body: usize,
    pub metrics: Option<PrometheusHandle>,
    /// `[server.cors]`, validated; None: no CORS headers.
    pub cors: Option<CorsConfig>,
    /// `server.body_read_timeout_ms`: a body that takes longer to arrive whole is a 408.
    pub body_timeout: Duration,
    /// `server.max_in_flight`: requests served at once; past it, 503 with `Retry-After`.
    pub max_in_flight: usize,
}

/// The process-wide Prometheus recorder (installed once; tests start many gateways).
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Sub-millisecond buckets: the gateway's overhead is what these must resolve.
            let fine = [
                0.000_05, 0.000_1, 0.000_2, 0.000_3, 0.000_5, 0.000_75, 0.001, 0.002, 0.005, 0.01,
                0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
            ];
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("seconds".into()), &fine)
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}

/// The gateway's routes under the layers listed in the module doc, in that order.
pub fn router(state: AppState) -> Router {
    let cors = state.cors.as_ref().map(cors_layer);
    let max_in_flight = state.max_in_flight.max(1);
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        // A catch-all, so route names with a `/` (`team/fast`) can be retrieved too.
        .route("/v1/models/{*id}", get(model))
        .route("/v1/feedback", post(feedback))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
        .layer(
            // ServiceBuilder runs its layers top to bottom: the first is the outermost.
            tower::ServiceBuilder::new()
                .layer(axum::middleware::from_fn(log::requests))
                .layer(layers::InFlightLayer::new(max_in_flight))
                .option_layer(cors)
                .layer(layers::CodingLayer),
        )
}

/// tower-http's CORS for `[server.cors]` (see the module doc for what is allowed and why).
fn cors_layer(c: &CorsConfig) -> CorsLayer {
    let origins = if c.allow_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // Validation normalised them to valid header values; none is dropped here.
        AllowOrigin::list(
            c.allow_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    let expose = [
        "x-tandem-route",
        "x-tandem-tier",
        "x-tandem-role",
        "x-tandem-cost-usd",
        "x-tandem-score",
        "x-tandem-capped",
        "x-tandem-tier-index",
        "x-tandem-tiers-called",
        "retry-after",
        "x-should-retry",
    ]
    .map(HeaderName::from_static);
    let layer = CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers(expose);
    match c.max_age_s {
        Some(s) => layer.max_age(Duration::from_secs(s)),
        None => layer,
    }
}

async fn not_found() -> GatewayError {
    GatewayError::NotFound(
        "no such endpoint; see /v1/chat/completions, /v1/models, /v1/feedback".into(),
    )
}

async fn wrong_method() -> GatewayError {
    GatewayError::MethodNotAllowed
}

/// The key in `Authorization: Bearer <key>`; the scheme name is case-insensitive (RFC 9110) and
/// may be followed by several spaces.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, key) = v.split_once([' ', '\t'])?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// The whole body, within `max` bytes and `within` (a deadline for the whole of it, not for
/// each piece: a body that trickles a byte at a time still ends at the deadline).
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    max: usize,
    within: Duration,
) -> Result<Bytes, GatewayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(GatewayError::BodyTooLarge(max));
    }
    let read = tokio::time::timeout(within, axum::body::to_bytes(body, max))
        .await
        .map_err(|_| GatewayError::RequestTimeout)?;
    read.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("length limit")) {
            GatewayError::BodyTooLarge(max)
        } else {
            GatewayError::BadRequest(format!("cannot read the request body: {e}"))
        }
    })
}

fn force_header(headers: &HeaderMap) -> Result<Option<Force>, GatewayError> {
    match headers
        .get("x-tandem-force")
        .map(|v| v.to_str().unwrap_or(""))
    {
        None => Ok(None),
        Some("small") => Ok(Some(Force::Small)),
        Some("large") => Ok(Some(Force::Large)),
        Some(other) => Err(GatewayError::BadRequest(format!(
            "header x-tandem-force must be `small` or `large`, got {other:?}"
        ))),
    }
}

async fn chat(
    State(st): State<AppState>,
    request: axum::extract::Request,
) -> Result<Response, GatewayError> {
    let t0 = Instant::now();
    // The request's parts by reference: the `HeaderMap` extractor would copy every header.
    let (mut parts, body) = request.into_parts();
    let headers = &parts.headers;
    let log = parts.extensions.remove::<log::RequestLog>();
    st.gateway.check_key(bearer(headers))?;
    let bytes = read_body(headers, body, st.max_body, st.body_timeout).await?;
    let mut req = ChatRequest::parse(&bytes)?;
    let force = force_header(headers)?;
    if let Some(ep) = headers.get("x-tandem-episode") {
        let ep = ep
            .to_str()
            .ok()
            .filter(|e| !e.is_empty() && e.len() <= 256)
            .ok_or_else(|| {
                GatewayError::BadRequest(
                    "header x-tandem-episode must be 1 to 256 visible ASCII characters".into(),
                )
            })?;
        req.tandem.get_or_insert_with(Default::default).episode = Some(ep.to_string());
    }
    let stream = req.stream;
    let include_usage = req.include_usage;
    if let Some(l) = &log {
        l.set(|f| {
            f.route = Some(req.model.clone());
            f.stream = stream;
        });
    }
    match st.gateway.chat(req, force).await? {
        Reply::Whole {
            body,
            info,
            upstream,
        } => {
            if let Some(l) = &log {
                note(l, &body, &info);
            }
            let mut resp = if stream {
                sse_response(Body::from(sse_whole(&body, include_usage)))
            } else {
                Json(&body).into_response()
            };
            set_headers(resp.headers_mut(), &info, true);
            let overhead = t0.elapsed().saturating_sub(upstream);
            metrics::histogram!("tandem_overhead_seconds", "route" => info.route.clone())
                .record(overhead.as_secs_f64());
            Ok(resp)
        }
        Reply::Stream(s) => {
            let head = s.head.clone();
            if let Some(l) = &log {
                l.set(|f| {
                    f.id = Some(s.id.clone());
                    f.tier = Some(head.tier.clone());
                    f.role = Some(head.role.clone());
                });
            }
            let mut resp = sse_live(s, log);
            // The final cost is only known at the end: it comes in the usage chunk's `tandem`.
            set_headers(resp.headers_mut(), &head, false);
            Ok(resp)
        }
    }
}

/// What the request log line says of a served answer.
fn note(l: &log::RequestLog, body: &serde_json::Map<String, serde_json::Value>, t: &TandemInfo) {
    l.set(|f| {
        f.id = body.get("id").and_then(|v| v.as_str()).map(str::to_string);
        f.route = Some(t.route.clone());
        f.tier = Some(t.tier.clone());
        f.role = Some(t.role.clone());
        f.cost_usd = Some(t.cost_usd);
        f.usage_estimated = t.usage_estimated;
    });
}

fn set_headers(h: &mut HeaderMap, t: &TandemInfo, with_cost: bool) {
    let mut put = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    put("x-tandem-route", t.route.clone());
    put("x-tandem-tier", t.tier.clone());
    put("x-tandem-role", t.role.clone());
    if with_cost {
        put("x-tandem-cost-usd", format!("{:.6}", t.cost_usd));
    }
    if let Some(s) = t.score {
        put("x-tandem-score", format!("{s:.4}"));
    }
    put("x-tandem-capped", t.capped.to_string());
    if let Some(i) = t.tier_index {
        put("x-tandem-tier-index", i.to_string());
    }
    if let Some(n) = t.tiers_called {
        put("x-tandem-tiers-called", n.to_string());
    }
}

fn sse_response(body: Body) -> Response {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// An answer streaming from its upstream, passed on chunk by chunk ([`StreamReply::next`]). An
/// upstream failure mid-stream ends the stream with an OpenAI error event; the request's log line
/// gets the stream's end.
fn sse_live(r: StreamReply, log: Option<log::RequestLog>) -> Response {
    let stream = futures_util::stream::unfold((r, log), |(mut r, log)| async move {
        let data = match r.next().await? {
            Event::Data(d) => d,
            Event::End {
                data,
                info,
                error,
                charged_usd,
            } => {
                if let Some(l) = &log {
                    l.set(|f| f.cost_usd = Some(charged_usd));
                    if let Some(t) = &info {
                        l.set(|f| {
                            f.cost_usd = Some(t.cost_usd);
                            f.usage_estimated = t.usage_estimated;
                        });
                    }
                    if let Some(e) = &error {
                        let i = e.info();
                        l.set(|f| {
                            f.error_kind = Some(i.kind);
                            f.error_code = i.code;
                        });
                    }
                }
                data
            }
        };
        Some((
            Ok::<_, std::convert::Infallible>(Bytes::from(data)),
            (r, log),
        ))
    });
    sse_response(Body::from_stream(stream))
}

async fn models(State(st): State<AppState>, headers: HeaderMap) -> Result<Response, GatewayError> {
    st.gateway.check_key(bearer(&headers))?;
    let data: Vec<_> = st
        .gateway
        .routes()
        .iter()
        .map(|r| json!({"id": r.name(), "object": "model", "created": 0, "owned_by": "tandem"}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

/// `GET /v1/models/{id}`: one route as OpenAI's model object. The key is checked first, so route
/// names cannot be probed without one.
async fn model(
    State(st): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, GatewayError> {
    st.gateway.check_key(bearer(&headers))?;
    let Path(id) = id.map_err(|e| GatewayError::BadRequest(format!("bad model id: {e}")))?;
    match st.gateway.routes().iter().find(|r| r.name() == id) {
        Some(r) => Ok(Json(
            json!({"id": r.name(), "object": "model", "created": 0, "owned_by": "tandem"}),
        )
        .into_response()),
        None => Err(GatewayError::UnknownRoute(id)),
    }
}

async fn feedback(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    st.gateway.check_key(bearer(&headers))?;
    let bytes = read_body(&headers, body, st.max_body, st.body_timeout).await?;
    let fb: Feedback =
        serde_json::from_slice(&bytes).map_err(|e| GatewayError::BadJson(e.to_string()))?;
    st.gateway.feedback(&fb).await?;
    Ok(
        Json(json!({"ok": true, "response_id": fb.response_id, "episode_id": fb.episode_id}))
            .into_response(),
    )
}

/// Liveness, and what an operator must act on ([`crate::Gateway::health`]).
async fn health(State(st): State<AppState>) -> Response {
    Json(st.gateway.health()).into_response()
}

async fn metrics_text(State(st): State<AppState>) -> Response {
    // Budget spend is state, not an event count: read at scrape time. After a restart it is what
    // the journal (or state file) restored, unlike `tandem_spend_micros_total`.
    // Breakers move from open to half-open with time alone: the gauge is read at scrape too.
    for u in st.gateway.upstreams() {
        u.health.publish_state();
    }
    log::publish_dropped_lines();
    for r in st.gateway.routes() {
        let s = r.budget.spent();
        let route = r.name().to_string();
        metrics::gauge!("tandem_budget_spent_micros", "route" => route.clone())
            .set(s.micros as f64);
        metrics::gauge!("tandem_budget_calls", "route" => route).set(s.calls as f64);
    }
    match &st.metrics {
        Some(h) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => GatewayError::Internal("metrics are not available in this process".into())
            .into_response(),
    }
}
