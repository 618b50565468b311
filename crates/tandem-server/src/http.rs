//! The HTTP surface, kept thin: each handler checks the key, reads and parses the body, calls the
//! [`Gateway`] and writes OpenAI's shapes. Order of work on a chat request, in one place:
//!
//! 1. authentication (`Authorization: Bearer`, when `server.api_keys_env` is set) — before the
//!    body is read, so an unauthenticated client cannot make the gateway buffer anything;
//! 2. body limit (`server.max_body_bytes`), then JSON parsing into the request shape;
//! 3. the pipeline ([`Gateway::chat`]): route, decision, budget, upstream calls, learning;
//! 4. response: JSON or an SSE stream, with `x-tandem-*` headers; the gateway's own overhead
//!    (total time less upstream time) goes to the `tandem_overhead_seconds` histogram.
//!
//! Every error, including unknown paths and wrong methods, is OpenAI-shaped.

use crate::error::GatewayError;
use crate::gateway::{Gateway, Reply, StreamReply};
use crate::openai::{ChatCompletion, ChatRequest, Feedback, Force, TandemInfo};
use crate::upstream::Piece;
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

#[derive(Clone)]
pub struct AppState {
    pub gateway: Arc<Gateway>,
    pub max_body: usize,
    pub metrics: Option<PrometheusHandle>,
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

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/v1/feedback", post(feedback))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

async fn not_found() -> GatewayError {
    GatewayError::NotFound(
        "no such endpoint; see /v1/chat/completions, /v1/models, /v1/feedback".into(),
    )
}

async fn wrong_method() -> GatewayError {
    GatewayError::MethodNotAllowed
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> Result<Bytes, GatewayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(GatewayError::BodyTooLarge(max));
    }
    axum::body::to_bytes(body, max).await.map_err(|e| {
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
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let t0 = Instant::now();
    st.gateway.check_key(bearer(&headers))?;
    let bytes = read_body(&headers, body, st.max_body).await?;
    let mut req: ChatRequest =
        serde_json::from_slice(&bytes).map_err(|e| GatewayError::BadJson(e.to_string()))?;
    let force = force_header(&headers)?;
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
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    match st.gateway.chat(req, force).await? {
        Reply::Whole {
            completion,
            upstream,
        } => {
            let mut resp = if stream {
                sse(&completion, include_usage)
            } else {
                Json(&completion).into_response()
            };
            set_headers(resp.headers_mut(), &completion.tandem, true);
            let overhead = t0.elapsed().saturating_sub(upstream);
            metrics::histogram!("tandem_overhead_seconds", "route" => completion.model.clone())
                .record(overhead.as_secs_f64());
            Ok(resp)
        }
        Reply::Stream(s) => {
            let head = s.head.clone();
            let mut resp = sse_live(s, include_usage);
            // The final cost is only known at the end: it comes in the last chunk's `tandem`.
            set_headers(resp.headers_mut(), &head, false);
            Ok(resp)
        }
    }
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
}

fn chunk(
    id: &str,
    created: u64,
    model: &str,
    delta: serde_json::Value,
    finish: Option<&str>,
) -> String {
    let v = json!({
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    format!("data: {v}\n\n")
}

fn usage_chunk(
    id: &str,
    created: u64,
    model: &str,
    usage: &crate::openai::WireUsage,
    t: &TandemInfo,
) -> String {
    let v = json!({
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [], "usage": usage, "tandem": t,
    });
    format!("data: {v}\n\n")
}

const DONE: &str = "data: [DONE]\n\n";

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

/// A whole answer as OpenAI's stream of chunks: the role, the content in word-sized pieces, the
/// finish reason, the usage when asked for, then `[DONE]`. A cascade's answer is judged in full
/// before the first byte, so its client sees one clean stream whichever model answered.
fn sse(c: &ChatCompletion, include_usage: bool) -> Response {
    let (id, created, model) = (c.id.as_str(), c.created, c.model.as_str());
    let content = c
        .choices
        .first()
        .map(|ch| ch.message.content.as_str())
        .unwrap_or("");
    let finish = c
        .choices
        .first()
        .map(|ch| ch.finish_reason.as_str())
        .unwrap_or("stop");
    let mut body = chunk(
        id,
        created,
        model,
        json!({"role": "assistant", "content": ""}),
        None,
    );
    for piece in pieces(content) {
        body.push_str(&chunk(id, created, model, json!({"content": piece}), None));
    }
    body.push_str(&chunk(id, created, model, json!({}), Some(finish)));
    if include_usage {
        body.push_str(&usage_chunk(id, created, model, &c.usage, &c.tandem));
    }
    body.push_str(DONE);
    sse_response(Body::from(body))
}

/// An answer streaming from its upstream, passed on piece by piece. An upstream failure
/// mid-stream ends the stream with an OpenAI error event.
fn sse_live(r: StreamReply, include_usage: bool) -> Response {
    let (id, created, model) = (r.id.clone(), r.created, r.model.clone());
    let (pieces, end) = r.into_parts();
    struct St {
        pieces: crate::upstream::Pieces,
        end: crate::gateway::StreamEnd,
        text: String,
        started: bool,
        over: bool,
    }
    let st = St {
        pieces,
        end,
        text: String::new(),
        started: false,
        over: false,
    };
    let stream = futures_util::stream::unfold(st, move |mut st| {
        let (id, model) = (id.clone(), model.clone());
        async move {
            if st.over {
                return None;
            }
            if !st.started {
                st.started = true;
                let c = chunk(
                    &id,
                    created,
                    &model,
                    json!({"role": "assistant", "content": ""}),
                    None,
                );
                return Some((Ok::<_, std::convert::Infallible>(Bytes::from(c)), st));
            }
            let out = match st.pieces.recv().await {
                Some(Ok(Piece::Text(t))) => {
                    st.text.push_str(&t);
                    chunk(&id, created, &model, json!({"content": t}), None)
                }
                Some(Ok(Piece::Done {
                    finish_reason,
                    usage,
                })) => {
                    st.over = true;
                    let text = std::mem::take(&mut st.text);
                    match st.end.finish(text, finish_reason.clone(), usage) {
                        Ok((info, usage)) => {
                            let mut out =
                                chunk(&id, created, &model, json!({}), Some(&finish_reason));
                            if include_usage {
                                out.push_str(&usage_chunk(&id, created, &model, &usage, &info));
                            }
                            out.push_str(DONE);
                            out
                        }
                        Err(e) => format!("data: {}\n\n", e.body()),
                    }
                }
                Some(Err(e)) => {
                    st.over = true;
                    format!("data: {}\n\n", e.body())
                }
                None => {
                    st.over = true;
                    let e = GatewayError::Internal("the upstream stream stopped".into());
                    format!("data: {}\n\n", e.body())
                }
            };
            Some((Ok(Bytes::from(out)), st))
        }
    });
    sse_response(Body::from_stream(stream))
}

/// Splits text after each run of whitespace, so pieces rejoin to exactly the text.
fn pieces(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_space = false;
    for (i, ch) in text.char_indices() {
        let space = ch.is_whitespace();
        if in_space && !space {
            out.push(&text[start..i]);
            start = i;
        }
        in_space = space;
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
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

async fn feedback(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    st.gateway.check_key(bearer(&headers))?;
    let bytes = read_body(&headers, body, st.max_body).await?;
    let fb: Feedback =
        serde_json::from_slice(&bytes).map_err(|e| GatewayError::BadJson(e.to_string()))?;
    st.gateway.feedback(&fb)?;
    Ok(
        Json(json!({"ok": true, "response_id": fb.response_id, "episode_id": fb.episode_id}))
            .into_response(),
    )
}

async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn metrics_text(State(st): State<AppState>) -> Response {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_rejoin_exactly() {
        for t in ["", "one", "two words", "  lead and trail  ", "a\n\nb c"] {
            assert_eq!(pieces(t).concat(), t);
        }
        assert_eq!(pieces("two words"), vec!["two ", "words"]);
    }
}
