//! The official `openai` Python package as a client of the gateway (installed by
//! `scripts/setup-python`; CI runs that first). Skips with a message when the package is absent,
//! unless TANDEM_REQUIRE_ASSETS=1 (as in CI), where absence fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::json;
use std::path::PathBuf;

fn client_dir() -> Option<PathBuf> {
    let home = std::env::var_os("TANDEM_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tandem")))?;
    let dir = home.join("py/openai");
    if dir.join("openai").is_dir() {
        Some(dir)
    } else if std::env::var("TANDEM_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!(
            "the openai client is not installed in {}; run scripts/setup-python",
            dir.display()
        );
    } else {
        eprintln!("skipping: the openai client is not installed (run scripts/setup-python)");
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_works_against_the_gateway() {
    let Some(py) = client_dir() else { return };
    std::env::set_var("TANDEM_TEST_LARGE_KEY", "sk-test");
    std::env::set_var("TANDEM_TEST_CLIENT_KEYS", "k1");
    let (_s, s_url) = mock(reply(|p| {
        if p.contains("hard") {
            ("maybe 7".into(), -3.0)
        } else {
            ("the answer is 4".into(), -0.05)
        }
    }))
    .await;
    let (_l, l_url) = mock(reply(|_| ("the answer is 4".into(), -0.01))).await;
    // Route "tools": every call answered get_weather(city="Paris") (streamed as tool-call deltas
    // with the arguments in fragments when the request streams).
    let (tools_up, tools_url) = mock(reply(|_| ("not a tool call".into(), -0.01))).await;
    tools_up.set_always(Some(Scripted::answer(
        json!({"role": "assistant", "content": null, "tool_calls": [{
            "id": "call_w1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}),
        "tool_calls",
    )));
    // Route "bad": the upstream refuses every call with a 400.
    let (bad_up, bad_url) = mock(reply(|_| ("should not be asked twice".into(), -0.01))).await;
    bad_up.set_always(Some(Scripted::error(
        400,
        json!({"error": {"message": "temperature is too hot", "type": "invalid_request_error",
                         "code": "invalid_value", "param": "temperature"}}),
    )));
    // Route "limited": the upstream rate-limits every call, asking for a 1 s wait.
    let (limited_up, limited_url) = mock(reply(|_| ("not rate-limited".into(), -0.01))).await;
    limited_up.set_always(Some(Scripted::Json {
        status: 429,
        headers: vec![("retry-after".into(), "1".into())],
        body: json!({"error": {"message": "slow down", "type": "requests",
                               "code": "rate_limit_exceeded", "param": null}}),
    }));
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        r#"[server]
api_keys_env = "TANDEM_TEST_CLIENT_KEYS"
[[upstream]]
name = "small"
kind = "openai"
base_url = "{s_url}"
model = "small-model"
price = "token:0.1:0.1"
timeout_ms = 2000
logprobs = true
[[upstream]]
name = "large"
kind = "openai"
base_url = "{l_url}"
model = "large-model"
api_key_env = "TANDEM_TEST_LARGE_KEY"
price = "token:10:30"
timeout_ms = 2000
[[upstream]]
name = "tool-up"
kind = "openai"
base_url = "{tools_url}"
model = "tool-model"
price = "token:1:1"
[[upstream]]
name = "bad-up"
kind = "openai"
base_url = "{bad_url}"
model = "bad-model"
price = "token:1:1"
[[upstream]]
name = "limited-up"
kind = "openai"
base_url = "{limited_url}"
model = "limited-model"
price = "token:1:1"
# The client's own retry is under test here: tandem passes the 429 on at once.
[upstream.retry]
attempts = 1
[[route]]
name = "t"
kind = "cascade"
small = "small"
large = "large"
threshold = 1.0
explore = 0.0
[[route]]
name = "tools"
kind = "fixed"
upstream = "tool-up"
[[route]]
name = "bad"
kind = "fixed"
upstream = "bad-up"
[[route]]
name = "limited"
kind = "fixed"
upstream = "limited-up"
"#
    );
    let gw = start(&cfg, dir.path()).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let url = gw.url.clone();
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(&url)
        .env("PYTHONPATH", &py)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "stdout: {stdout}\nstderr: {stderr}"
    );
    // The tool requests reached the upstream whole: create, parse, stream.
    let bodies = tools_up.bodies();
    assert_eq!(bodies.len(), 3, "{bodies:#?}");
    for b in &bodies {
        assert_eq!(b["model"], "tool-model", "{b}");
        assert_eq!(b["tools"][0]["function"]["name"], "get_weather", "{b}");
        assert_eq!(
            b["tools"][0]["function"]["parameters"]["required"],
            json!(["city"]),
            "{b}"
        );
        assert_eq!(b["tools"][0]["function"]["strict"], true, "{b}");
        assert_eq!(
            b["tool_choice"],
            json!({"type": "function", "function": {"name": "get_weather"}}),
            "{b}"
        );
        assert!(b.get("tandem").is_none(), "{b}");
    }
    assert_eq!(bodies[2]["stream"], true, "{}", bodies[2]);
    // x-should-retry: false kept the client (max_retries = 2) from retrying the 400.
    assert_eq!(bad_up.calls(), 1, "the 400 was asked once");
    // The 429 said x-should-retry: true and Retry-After: 1; the client (max_retries = 1) retried once.
    assert_eq!(
        limited_up.calls(),
        2,
        "the 429 was retried once by the client"
    );
    gw.stop().await;
}
