//! A real LLM server as an upstream: llama.cpp's OpenAI-compatible server (llama-cpp-python,
//! built from source by scripts/setup-llama-server) serving SmolLM2-135M, with tandem routing
//! between it and the same model in-process. Skips when either is missing, unless
//! TANDEM_REQUIRE_ASSETS=1 (as in CI), where absence fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::start;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tandem_models::assets::{find, Store};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn required() -> bool {
    std::env::var("TANDEM_REQUIRE_ASSETS").is_ok_and(|v| v == "1")
}

fn prerequisites() -> Option<(PathBuf, PathBuf)> {
    let store = Store::default_home();
    let py = store.home().join("py/llama-server");
    let model = find("smollm2-135m").ok().and_then(|_| {
        store
            .path("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")
            .ok()
    });
    match (py.join("llama_cpp").is_dir(), model) {
        (true, Some(m)) => Some((py, m)),
        _ => {
            assert!(
                !required(),
                "llama.cpp's server or smollm2-135m is missing; run scripts/setup-llama-server and scripts/setup smollm2-135m"
            );
            eprintln!("skipping: llama.cpp's server is not installed (scripts/setup-llama-server)");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_llama_cpp_server_as_the_small_upstream() {
    let Some((py, model)) = prerequisites() else {
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("llama.log")).unwrap();
    let _server = Server(
        Command::new("python3")
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(&model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--n_ctx",
                "2048",
                "--n_threads",
                "2",
                "--model_alias",
                "smollm2",
            ])
            .env("PYTHONPATH", &py)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}/v1");
    let client = reqwest::Client::new();
    let t0 = Instant::now();
    loop {
        if client
            .get(format!("{base}/models"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        let log = std::fs::read_to_string(dir.path().join("llama.log")).unwrap_or_default();
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "llama.cpp's server did not start:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let cfg = format!(
        r#"
[[upstream]]
name = "llama-server"
kind = "openai"
base_url = "{base}"
model = "smollm2"
price = "token:0.02"
timeout_ms = 60000
[[upstream]]
name = "in-process"
kind = "gguf"
asset = "smollm2-135m"
price = "token:0.1:0.3"
[[route]]
name = "t"
kind = "cascade"
small = "llama-server"
large = "in-process"
gate = "logprob"
threshold = 1e9
explore = 0.0
max_tokens = 12
"#
    );
    let gw = start(&cfg, dir.path()).await;
    let url = format!("{}/v1/chat/completions", gw.url);
    let body = json!({"model": "t", "messages": [{"role": "user", "content": "Name a fruit."}]});
    // The server's own token log-probabilities judge its answer (under the huge threshold: kept).
    let r = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tandem-tier"], "llama-server");
    let score: f32 = r.headers()["x-tandem-score"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        score.is_finite() && score >= 0.0,
        "mean −log-prob {score}: the server gave log-probabilities"
    );
    let v: Value = r.json().await.unwrap();
    assert!(!v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .trim()
        .is_empty());
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    // Forced large: the in-process model answers the same request.
    let r = client
        .post(&url)
        .header("x-tandem-force", "large")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-tandem-tier"], "in-process");
    // Forced small and streamed: the server's SSE passes through.
    let mut s = body.clone();
    s["stream"] = json!(true);
    let text = client
        .post(&url)
        .header("x-tandem-force", "small")
        .json(&s)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let content: String = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert!(
        !content.trim().is_empty() && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );
    gw.stop().await;
}
