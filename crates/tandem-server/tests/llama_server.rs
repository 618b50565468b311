//! A real LLM server as an upstream: llama.cpp's OpenAI-compatible server (llama-cpp-python,
//! built from source by scripts/setup-llama-server) serving SmolLM2-135M, with tandem routing
//! between it and the same model in-process. Skips when either is missing, unless
//! TANDEM_REQUIRE_ASSETS=1 (as in CI), where absence fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{mock, reply, start, Scripted};
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

/// Starts llama.cpp's server on a free port with `extra` flags; returns it and its base URL
/// (with `/v1`) once it answers `GET /v1/models`. Its log goes to `dir/<name>.log`.
async fn llama_server(
    py: &std::path::Path,
    model: &std::path::Path,
    alias: &str,
    extra: &[&str],
    dir: &std::path::Path,
) -> (Server, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log_path = dir.join(format!("{alias}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let server = Server(
        Command::new("python3")
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--n_ctx",
                "2048",
                "--n_threads",
                "2",
                "--model_alias",
                alias,
            ])
            .args(extra)
            .env("PYTHONPATH", py)
            .stdout(Stdio::from(log.try_clone().unwrap()))
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
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "llama.cpp's server did not start:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    (server, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_llama_cpp_server_as_the_small_upstream() {
    let Some((py, model)) = prerequisites() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_server, base) = llama_server(&py, &model, "smollm2", &[], dir.path()).await;
    let client = reqwest::Client::new();
    let cfg = format!(
        r#"
[[upstream]]
name = "llama-server"
kind = "openai"
base_url = "{base}"
model = "smollm2"
price = "token:0.02"
timeout_ms = 60000
logprobs = true
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
    let tier = r.headers()["x-tandem-tier"].to_str().unwrap().to_string();
    let score: f32 = r.headers()["x-tandem-score"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        tier,
        "llama-server",
        "{v}\nllama.cpp's log:\n{}",
        std::fs::read_to_string(dir.path().join("smollm2.log")).unwrap_or_default()
    );
    assert!(
        score.is_finite() && score >= 0.0,
        "mean −log-prob {score}: the server gave log-probabilities: {v}"
    );
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

/// The tool-call answer of a chat completion: `(name, arguments parsed as JSON)`.
fn tool_call(v: &Value) -> (String, Value) {
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function", "{v}");
    assert!(call["id"].as_str().is_some_and(|id| !id.is_empty()), "{v}");
    let name = call["function"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let args = call["function"]["arguments"].as_str().unwrap_or_default();
    let parsed: Value = serde_json::from_str(args)
        .unwrap_or_else(|e| panic!("arguments {args:?} are not JSON ({e}): {v}"));
    (name, parsed)
}

/// The server with a tool-capable chat format (`chatml-function-calling`: a `tool_choice` naming a
/// function makes it prompt `functions.<name>:` and constrain the arguments with a grammar built
/// from the function's JSON schema) serves a tool call through a fixed route (whole and streamed)
/// and as a cascade's small upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_llama_cpp_server_serves_tool_calls() {
    let Some((py, model)) = prerequisites() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_server, base) = llama_server(
        &py,
        &model,
        "smollm2-tools",
        &["--chat_format", "chatml-function-calling"],
        dir.path(),
    )
    .await;
    // The cascade's large upstream: a mock that answers the same tool with its own arguments.
    let (large, large_url) = mock(reply(|_| ("not a tool call".into(), -0.01))).await;
    large.set_always(Some(Scripted::answer(
        json!({"role": "assistant", "content": null, "tool_calls": [{
            "id": "call_large", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Large\"}"}}]}),
        "tool_calls",
    )));
    let cfg = format!(
        r#"
[[upstream]]
name = "llama-tools"
kind = "openai"
base_url = "{base}"
model = "smollm2-tools"
price = "token:0.02"
timeout_ms = 60000
logprobs = true
[[upstream]]
name = "large-mock"
kind = "openai"
base_url = "{large_url}"
model = "large-model"
price = "token:1:2"
timeout_ms = 10000
[[route]]
name = "fixed"
kind = "fixed"
upstream = "llama-tools"
[[route]]
name = "cascade"
kind = "cascade"
small = "llama-tools"
large = "large-mock"
gate = "logprob"
threshold = 1e9
explore = 0.0
[[route]]
name = "cascade-learned"
kind = "cascade"
small = "llama-tools"
large = "large-mock"
gate = "learned"
threshold = 1e9
explore = 0.0
"#
    );
    let gw = start(&cfg, dir.path()).await;
    let url = format!("{}/v1/chat/completions", gw.url);
    let client = reqwest::Client::new();
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string", "maxLength": 24}},
                       "required": ["city"], "additionalProperties": false}}}]);
    let tool_choice = json!({"type": "function", "function": {"name": "get_weather"}});
    let body = |route: &str| {
        json!({"model": route, "messages": [
                  {"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is the weather in Paris?"}],
               "tools": tools, "tool_choice": tool_choice, "max_tokens": 48, "temperature": 0})
    };

    // Fixed route, whole answer: the server's tool call passes through (its legacy
    // `function_call` field too).
    let r = client.post(&url).json(&body("fixed")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tandem-tier"], "llama-tools");
    let v: Value = r.json().await.unwrap();
    let (name, args) = tool_call(&v);
    assert_eq!(name, "get_weather", "{v}");
    assert!(args["city"].is_string(), "the required key: {v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    assert_eq!(
        v["choices"][0]["message"]["function_call"]["name"], "get_weather",
        "{v}"
    );
    assert_eq!(v["model"], "fixed", "{v}");

    // Fixed route, streamed: the tool-call deltas pass through and assemble to a valid call.
    let mut s = body("fixed");
    s["stream"] = json!(true);
    let text = client
        .post(&url)
        .json(&s)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let (mut name, mut arguments, mut finish) = (String::new(), String::new(), Value::Null);
    for e in text
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
    {
        let c: Value = serde_json::from_str(e).unwrap();
        let choice = &c["choices"][0];
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
        if let Some(calls) = choice["delta"]["tool_calls"].as_array() {
            for call in calls {
                assert_eq!(call["index"], 0, "{e}");
                if let Some(n) = call["function"]["name"].as_str() {
                    if name.is_empty() {
                        name = n.to_string();
                    }
                }
                arguments.push_str(call["function"]["arguments"].as_str().unwrap_or(""));
            }
        }
    }
    assert_eq!(name, "get_weather", "{text}");
    let parsed: Value = serde_json::from_str(&arguments)
        .unwrap_or_else(|e| panic!("streamed arguments {arguments:?} are not JSON ({e}): {text}"));
    assert!(parsed["city"].is_string(), "{text}");
    assert_eq!(finish, "tool_calls", "{text}");

    // Cascade: the llama server is the small upstream, asked with log-probabilities.
    let r = client
        .post(&url)
        .json(&body("cascade"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tier = r.headers()["x-tandem-tier"].to_str().unwrap().to_string();
    let score = r.headers()["x-tandem-score"].to_str().unwrap().to_string();
    let v: Value = r.json().await.unwrap();
    let (name, args) = tool_call(&v);
    assert_eq!(name, "get_weather", "{v}");
    assert!(args["city"].is_string(), "the required key: {v}");
    assert_eq!(v["model"], "cascade", "{v}");
    assert_eq!(v["tandem"]["tier"], tier.as_str(), "{v}");
    // Which tier served depends on the small draft's score (llama-cpp-python gives no
    // log-probabilities for a grammar-constrained tool call); either way the answer is that tier's.
    eprintln!(
        "cascade tool call served by {tier} (score {score}, escalated {})",
        v["tandem"]["escalated"]
    );
    match tier.as_str() {
        "llama-tools" => {
            assert_eq!(large.calls(), 0, "{v}");
            assert_eq!(v["tandem"]["escalated"], false, "{v}");
        }
        "large-mock" => {
            assert_eq!(large.calls(), 1, "{v}");
            assert_eq!(v["tandem"]["escalated"], true, "{v}");
            assert_eq!(args, json!({"city": "Large"}), "{v}");
            assert_eq!(v["tandem"]["tried"], 2, "{v}");
            // The large call got the client's request whole, without the gate's logprobs.
            let b = large.bodies().pop().unwrap();
            assert_eq!(b["tools"], tools, "{b}");
            assert_eq!(b["tool_choice"], tool_choice, "{b}");
            assert_eq!(b["max_tokens"], 48, "{b}");
            assert!(
                b.get("logprobs").is_none() && b.get("top_logprobs").is_none(),
                "{b}"
            );
        }
        other => panic!("unexpected tier {other}: {v}"),
    }

    // Cascade on a gate that needs no log-probabilities (learned, under a huge threshold): the
    // small server's valid tool call is judged usable and served.
    let large_before = large.calls();
    let r = client
        .post(&url)
        .json(&body("cascade-learned"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tier = r.headers()["x-tandem-tier"].to_str().unwrap().to_string();
    let v: Value = r.json().await.unwrap();
    assert_eq!(tier, "llama-tools", "{v}");
    assert_eq!(large.calls(), large_before, "{v}");
    let (name, args) = tool_call(&v);
    assert_eq!(name, "get_weather", "{v}");
    assert!(args["city"].is_string(), "the required key: {v}");
    assert_eq!(v["tandem"]["role"], "small", "{v}");
    assert_eq!(v["tandem"]["escalated"], false, "{v}");
    gw.stop().await;
}
