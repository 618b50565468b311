//! A mock OpenAI upstream (in-process axum on a loopback port) that can answer, be slow, fail with
//! 5xx, return garbage or cut its body, and counts its calls; and a gateway started on a port.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
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
}

impl Mock {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

async fn complete(State(m): State<Arc<Mock>>, Json(body): Json<Value>) -> Response {
    m.calls.fetch_add(1, Ordering::SeqCst);
    *m.last.lock().unwrap() = body.clone();
    let delay = m.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
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

/// Starts a mock; returns it and its base URL (with `/v1`).
pub async fn mock(reply: Reply) -> (Arc<Mock>, String) {
    let m = Arc::new(Mock {
        calls: AtomicUsize::new(0),
        mode: AtomicU8::new(OK),
        delay_ms: AtomicU64::new(0),
        chunk_delay_ms: AtomicU64::new(0),
        reply,
        last: std::sync::Mutex::new(Value::Null),
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
    let max_body = v.server.max_body_bytes;
    let gw = Arc::new(Gateway::start(&v).unwrap());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(tandem_server::serve(gw.clone(), l, max_body, async move {
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
