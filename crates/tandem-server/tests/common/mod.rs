//! A mock OpenAI upstream (in-process axum on a loopback port) that can answer, be slow, fail with
//! 5xx, return garbage or cut its body, and counts its calls; and a gateway started on a port.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use tandem_server::{Gateway, ServerConfig};

pub const OK: u8 = 0;
pub const FAIL_500: u8 = 1;
pub const GARBAGE: u8 = 2;

/// How the mock answers a prompt: the reply text and the log-probability of each of its tokens.
pub type Reply = Arc<dyn Fn(&str) -> (String, f32) + Send + Sync>;

pub struct Mock {
    pub calls: AtomicUsize,
    pub mode: AtomicU8,
    pub delay_ms: AtomicU64,
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

/// Starts a mock; returns it and its base URL (with `/v1`).
pub async fn mock(reply: Reply) -> (Arc<Mock>, String) {
    let m = Arc::new(Mock {
        calls: AtomicUsize::new(0),
        mode: AtomicU8::new(OK),
        delay_ms: AtomicU64::new(0),
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
"#
    )
}

pub fn chat_body(route: &str, text: &str) -> Value {
    json!({"model": route, "messages": [{"role": "user", "content": text}]})
}
