//! A mock OpenAI upstream (in-process axum on a loopback port) that can answer, be slow, fail with
//! 5xx, return garbage or cut its body, and counts its calls; and a gateway started on a port.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use tandem_server::{Gateway, ServerConfig};

pub const OK: u8 = 0;
pub const FAIL_500: u8 = 1;
pub const GARBAGE: u8 = 2;
/// Streams: stop after the first piece, without a finish.
pub const CUT: u8 = 3;

/// How the mock answers a prompt: the reply text and the log-probability of each of its tokens.
pub type Reply = Arc<dyn Fn(&str) -> (String, f32) + Send + Sync>;

pub struct Mock {
    pub calls: AtomicUsize,
    pub mode: AtomicU8,
    pub delay_ms: AtomicU64,
    /// Streams: pause before each piece after the first.
    pub chunk_delay_ms: AtomicU64,
    pub reply: Reply,
    /// The last request body, to check what was forwarded.
    pub last: std::sync::Mutex<Value>,
    /// Scripted replies, consumed one per call (front first); when empty, `always` answers, and
    /// when that is unset too, the `reply` behaviour above.
    pub script: std::sync::Mutex<VecDeque<Scripted>>,
    /// The reply to every call once `script` is empty (None: the `reply` behaviour).
    pub always: std::sync::Mutex<Option<Scripted>>,
    /// Every request body received, in arrival order.
    pub bodies: std::sync::Mutex<Vec<Value>>,
    /// The request headers of the last call (names lower-case).
    pub last_headers: std::sync::Mutex<Vec<(String, String)>>,
}

impl Mock {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Queues one scripted reply (answers the next call not answered by an earlier one).
    pub fn push(&self, s: Scripted) {
        self.script.lock().unwrap().push_back(s);
    }

    /// Answers every call with `s` once the queue is empty (None: back to `reply`).
    pub fn set_always(&self, s: Option<Scripted>) {
        *self.always.lock().unwrap() = s;
    }

    /// Every body received so far.
    pub fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }

    /// The value of the last call's request header `name` (case-insensitive).
    pub fn last_header(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        self.last_headers
            .lock()
            .unwrap()
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    }
}

async fn complete(
    State(m): State<Arc<Mock>>,
    headers: HeaderMap,
    raw: axum::body::Bytes,
) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&raw) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "mock: body is not JSON", "type": "invalid_request_error"}})),
        )
            .into_response();
    };
    m.calls.fetch_add(1, Ordering::SeqCst);
    *m.last.lock().unwrap() = body.clone();
    m.bodies.lock().unwrap().push(body.clone());
    *m.last_headers.lock().unwrap() = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let delay = m.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    let scripted = m.script.lock().unwrap().pop_front();
    let scripted = scripted.or_else(|| m.always.lock().unwrap().clone());
    if let Some(s) = scripted {
        return s.render(&body);
    }
    match m.mode.load(Ordering::SeqCst) {
        FAIL_500 => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": {"message": "mock is down", "type": "server_error"}})),
            )
                .into_response()
        }
        GARBAGE => return (StatusCode::OK, "{\"choices\": [oops").into_response(),
        _ => {}
    }
    let prompt = body["messages"]
        .as_array()
        .and_then(|ms| ms.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let (text, lp) = (m.reply)(&prompt);
    let words: Vec<&str> = text.split_whitespace().collect();
    if body["stream"].as_bool().unwrap_or(false) {
        return sse(&m, &body, &text, prompt.len() / 4 + 1, words.len());
    }
    let logprobs = body["logprobs"].as_bool().unwrap_or(false).then(|| {
        json!({"content": words.iter().map(|w| json!({
            "token": w, "logprob": lp,
            "top_logprobs": [{"token": w, "logprob": lp}, {"token": "x", "logprob": lp - 1.0}],
        })).collect::<Vec<_>>()})
    });
    Json(json!({
        "id": "mock", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop", "logprobs": logprobs}],
        "usage": {"prompt_tokens": prompt.len() / 4 + 1, "completion_tokens": words.len(),
                  "total_tokens": prompt.len() / 4 + 1 + words.len()},
    }))
    .into_response()
}

fn sse(
    m: &Mock,
    body: &Value,
    text: &str,
    prompt_tokens: usize,
    completion_tokens: usize,
) -> Response {
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "mock", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        )
    };
    let mut events = vec![chunk(json!({"role": "assistant"}), Value::Null)];
    // Split after whitespace so the pieces rejoin to the exact text.
    let mut rest = text;
    while !rest.is_empty() {
        let cut = rest
            .char_indices()
            .skip_while(|(_, c)| !c.is_whitespace())
            .find(|(_, c)| !c.is_whitespace())
            .map_or(rest.len(), |(i, _)| i);
        events.push(chunk(json!({"content": &rest[..cut]}), Value::Null));
        rest = &rest[cut..];
    }
    if m.mode.load(Ordering::SeqCst) == CUT {
        events.truncate(2);
    } else {
        events.push(chunk(json!({}), json!("stop")));
        if body["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false)
        {
            events.push(format!(
                "data: {}\n\n",
                json!({"id": "mock", "object": "chat.completion.chunk", "choices": [],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}})
            ));
        }
        events.push("data: [DONE]\n\n".into());
    }
    let pause = m.chunk_delay_ms.load(Ordering::SeqCst);
    let stream =
        futures_util::stream::iter(events.into_iter().enumerate()).then(move |(i, e)| async move {
            if i > 1 && pause > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            }
            Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(e))
        });
    let mut r = Response::new(axum::body::Body::from_stream(stream));
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    r
}

/// Computes a scripted reply from the request body.
pub type Responder = Arc<dyn Fn(&Value) -> Scripted + Send + Sync>;

/// One scripted reply of the mock.
#[derive(Clone)]
pub enum Scripted {
    /// A JSON body with this status and these headers.
    Json {
        status: u16,
        headers: Vec<(String, String)>,
        body: Value,
    },
    /// A 200 event stream: each chunk is sent as `data: <chunk>\n\n` exactly (put `"[DONE]"`
    /// in the list yourself; leave it out for a stream that stops without it), with a pause of
    /// `delay_ms` before every chunk after the first.
    Sse { chunks: Vec<String>, delay_ms: u64 },
    /// A 200 event stream with a pause before each chunk (`(pause_ms, chunk)`).
    SseTimed { chunks: Vec<(u64, String)> },
    /// Any body, as bytes, with this status and these headers.
    Raw {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// A whole assistant answer, sent as a `chat.completion` object when the request is not
    /// streamed and as chunks when it is (role, content pieces, tool-call deltas with their
    /// arguments in fragments, each other message field in a delta, the finish chunk, the usage
    /// chunk when the request asked `stream_options.include_usage` and `usage` is an object,
    /// `[DONE]`). `usage`: None leaves the field out, `Some(Value::Null)` sends `"usage": null`
    /// (in streams: on every chunk). `logprobs` (Null: none) is the choice's; `extra` is merged
    /// into the top-level object (every chunk, in streams).
    Answer {
        message: Value,
        finish_reason: Value,
        logprobs: Value,
        usage: Option<Value>,
        extra: Value,
    },
    /// The reply computed from the request body.
    With(Responder),
}

impl Scripted {
    /// A 200 JSON body.
    pub fn json(body: Value) -> Scripted {
        Scripted::Json {
            status: 200,
            headers: vec![],
            body,
        }
    }

    /// An error status with an OpenAI-shaped body.
    pub fn error(status: u16, body: Value) -> Scripted {
        Scripted::Json {
            status,
            headers: vec![],
            body,
        }
    }

    /// A 200 stream of these JSON chunks, then `[DONE]`.
    pub fn sse(chunks: Vec<Value>, delay_ms: u64) -> Scripted {
        let mut chunks: Vec<String> = chunks.iter().map(Value::to_string).collect();
        chunks.push("[DONE]".into());
        Scripted::Sse { chunks, delay_ms }
    }

    /// An answer of `message` with `finish_reason`, no logprobs, usage 5/3, no extra fields.
    pub fn answer(message: Value, finish_reason: &str) -> Scripted {
        Scripted::Answer {
            message,
            finish_reason: json!(finish_reason),
            logprobs: Value::Null,
            usage: Some(json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8})),
            extra: json!({}),
        }
    }

    /// A plain text answer.
    pub fn text(text: &str) -> Scripted {
        Scripted::answer(json!({"role": "assistant", "content": text}), "stop")
    }

    pub fn with(f: impl Fn(&Value) -> Scripted + Send + Sync + 'static) -> Scripted {
        Scripted::With(Arc::new(f))
    }

    fn render(self, req: &Value) -> Response {
        match self {
            Scripted::Json {
                status,
                headers,
                body,
            } => with_headers(status, &headers, "application/json", body.to_string()),
            Scripted::Raw {
                status,
                headers,
                body,
            } => with_headers(status, &headers, "text/plain", body),
            Scripted::Sse { chunks, delay_ms } => {
                let timed = chunks
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| (if i == 0 { 0 } else { delay_ms }, c))
                    .collect();
                sse_timed(timed)
            }
            Scripted::SseTimed { chunks } => sse_timed(chunks),
            Scripted::Answer {
                message,
                finish_reason,
                logprobs,
                usage,
                extra,
            } => {
                if req["stream"].as_bool().unwrap_or(false) {
                    let chunks = answer_chunks(
                        req,
                        &message,
                        &finish_reason,
                        &logprobs,
                        usage.as_ref(),
                        &extra,
                    );
                    sse_timed(chunks.into_iter().map(|c| (0, c)).collect())
                } else {
                    let mut body = json!({
                        "id": "mock-1", "object": "chat.completion", "created": 1, "model": req["model"],
                        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason,
                                     "logprobs": logprobs}],
                    });
                    if let Some(u) = usage {
                        body["usage"] = u;
                    }
                    merge(&mut body, &extra);
                    with_headers(200, &[], "application/json", body.to_string())
                }
            }
            Scripted::With(f) => f(req).render(req),
        }
    }
}

fn merge(into: &mut Value, extra: &Value) {
    if let (Some(o), Some(e)) = (into.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
}

fn with_headers(
    status: u16,
    headers: &[(String, String)],
    content_type: &str,
    body: String,
) -> Response {
    let mut r = Response::new(axum::body::Body::from(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_str(content_type).unwrap(),
    );
    for (k, v) in headers {
        r.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            axum::http::HeaderValue::from_str(v).unwrap(),
        );
    }
    r
}

fn sse_timed(chunks: Vec<(u64, String)>) -> Response {
    let stream = futures_util::stream::iter(chunks).then(|(pause, c)| async move {
        if pause > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        }
        Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(format!("data: {c}\n\n")))
    });
    let mut r = Response::new(axum::body::Body::from_stream(stream));
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    r
}

/// The chunks (event payloads, `[DONE]` last) of a streamed [`Scripted::Answer`].
pub fn answer_chunks(
    req: &Value,
    message: &Value,
    finish_reason: &Value,
    logprobs: &Value,
    usage: Option<&Value>,
    extra: &Value,
) -> Vec<String> {
    let chunk = |delta: Value, finish: Value, lp: &Value| {
        let mut c = json!({"id": "mock-1", "object": "chat.completion.chunk", "created": 1,
                           "model": req["model"],
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        if !lp.is_null() {
            c["choices"][0]["logprobs"] = lp.clone();
        }
        if let Some(Value::Null) = usage {
            c["usage"] = Value::Null;
        }
        merge(&mut c, extra);
        c.to_string()
    };
    let mut out = vec![chunk(
        json!({"role": message["role"]}),
        Value::Null,
        &Value::Null,
    )];
    let mut lp_sent = logprobs.is_null();
    if let Some(text) = message["content"].as_str() {
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(4) {
            let lp = if lp_sent {
                Value::Null
            } else {
                logprobs.clone()
            };
            lp_sent = true;
            out.push(chunk(
                json!({"content": piece.iter().collect::<String>()}),
                Value::Null,
                &lp,
            ));
        }
    }
    if let Some(calls) = message["tool_calls"].as_array() {
        for (i, c) in calls.iter().enumerate() {
            out.push(chunk(
                json!({"tool_calls": [{"index": i, "id": c["id"], "type": c["type"],
                                       "function": {"name": c["function"]["name"], "arguments": ""}}]}),
                Value::Null,
                &Value::Null,
            ));
            let args: Vec<char> = c["function"]["arguments"]
                .as_str()
                .unwrap_or("")
                .chars()
                .collect();
            for frag in args.chunks(5) {
                out.push(chunk(
                    json!({"tool_calls": [{"index": i, "function": {"arguments": frag.iter().collect::<String>()}}]}),
                    Value::Null,
                    &Value::Null,
                ));
            }
        }
    }
    if let Some(o) = message.as_object() {
        for (k, v) in o {
            if !matches!(k.as_str(), "role" | "content" | "tool_calls") && !v.is_null() {
                out.push(chunk(json!({ k.clone(): v }), Value::Null, &Value::Null));
            }
        }
    }
    let lp = if lp_sent {
        Value::Null
    } else {
        logprobs.clone()
    };
    out.push(chunk(json!({}), finish_reason.clone(), &lp));
    if req["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false)
    {
        if let Some(u) = usage.filter(|u| u.is_object()) {
            let mut c = json!({"id": "mock-1", "object": "chat.completion.chunk", "created": 1,
                               "model": req["model"], "choices": [], "usage": u});
            merge(&mut c, extra);
            out.push(c.to_string());
        }
    }
    out.push("[DONE]".into());
    out
}

/// Starts a mock; returns it and its base URL (with `/v1`).
pub async fn mock(reply: Reply) -> (Arc<Mock>, String) {
    let m = Arc::new(Mock {
        calls: AtomicUsize::new(0),
        mode: AtomicU8::new(OK),
        delay_ms: AtomicU64::new(0),
        chunk_delay_ms: AtomicU64::new(0),
        reply,
        last: std::sync::Mutex::new(Value::Null),
        script: std::sync::Mutex::new(VecDeque::new()),
        always: std::sync::Mutex::new(None),
        bodies: std::sync::Mutex::new(Vec::new()),
        last_headers: std::sync::Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(complete))
        .with_state(m.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (m, format!("http://{addr}/v1"))
}

pub fn reply(f: impl Fn(&str) -> (String, f32) + Send + Sync + 'static) -> Reply {
    Arc::new(f)
}

pub struct Running {
    pub url: String,
    pub gateway: Arc<Gateway>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Running {
    /// Stops the server gracefully (which persists learned state) and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

pub async fn start(toml_text: &str, dir: &Path) -> Running {
    let cfg: ServerConfig = toml::from_str(toml_text).unwrap();
    let v = cfg
        .validate(Path::new("test.toml"), dir.to_path_buf())
        .unwrap();
    let server = v.server.clone();
    let gw = Arc::new(Gateway::start(&v).unwrap());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(tandem_server::serve(gw.clone(), l, server, async move {
        let _ = rx.await;
    }));
    Running {
        url: format!("http://{addr}"),
        gateway: gw,
        stop: Some(tx),
        task: Some(task),
    }
}

pub fn upstreams(small: &str, large: &str, large_price: &str) -> String {
    format!(
        r#"
[[upstream]]
name = "small"
kind = "openai"
base_url = "{small}"
model = "small-model"
logprobs = true
price = "token:0.1:0.1"
timeout_ms = 2000
[[upstream]]
name = "large"
kind = "openai"
base_url = "{large}"
model = "large-model"
api_key_env = "TANDEM_TEST_LARGE_KEY"
price = "{large_price}"
timeout_ms = 300
first_token_timeout_ms = 200
idle_timeout_ms = 150
"#
    )
}

pub fn chat_body(route: &str, text: &str) -> Value {
    json!({"model": route, "messages": [{"role": "user", "content": text}]})
}

/// Posts `body` to the gateway's chat completions.
pub async fn post_chat(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A response header's value ("" when it is absent).
pub fn header(r: &reqwest::Response, k: &str) -> String {
    r.headers()
        .get(k)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// The small model is sure of "easy" prompts and unsure of "hard" ones; both answer the same
/// text so that escalations look like agreement unless the prompt says otherwise.
pub fn small_reply() -> Reply {
    reply(|p| {
        if p.contains("hard") || p.contains("proof") {
            ("maybe 7".into(), -3.0)
        } else {
            ("the answer is 4".into(), -0.05)
        }
    })
}

pub fn large_reply() -> Reply {
    reply(|_| ("the answer is 4".into(), -0.01))
}
