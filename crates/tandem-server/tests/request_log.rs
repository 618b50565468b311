//! The request log: one `tandem::request` line per HTTP request, failures included, with status,
//! error type and code, route, upstream, role, response id and cost — and never a prompt or a key.
//! Its own test binary: the tracing subscriber that captures the lines is process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const CLIENT_KEY: &str = "k-client-SECRET-0b9e";
const WRONG_KEY: &str = "k-wrong-SECRET-77aa";
const UPSTREAM_KEY: &str = "sk-upstream-SECRET-d41c";
const PROMPT: &str = "PROMPT-SECRET-TEXT-5e21 what is 2+2?";

#[derive(Clone)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything logged at info and above in this process, as JSON lines.
fn captured() -> &'static Buf {
    static BUF: OnceLock<Buf> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Buf(Arc::new(Mutex::new(Vec::new())));
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::set_global_default(sub).unwrap();
        buf
    })
}

fn text() -> String {
    String::from_utf8(captured().0.lock().unwrap().clone()).unwrap()
}

fn request_lines() -> Vec<Value> {
    text()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["target"] == "tandem::request")
        .collect()
}

/// Waits for the `n`th request line (a stream's comes when its body ends) and returns it.
async fn line(n: usize) -> Value {
    for _ in 0..200 {
        let lines = request_lines();
        if lines.len() >= n {
            assert_eq!(lines.len(), n, "one line per request: {lines:#?}");
            return lines[n - 1].clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no request line {n}: {:#?}", request_lines());
}

/// The line is for this request and status, with this error type and code (None: no failure).
fn check(l: &Value, method: &str, path: &str, status: u16, error: Option<(&str, Option<&str>)>) {
    assert_eq!(l["level"], "INFO", "{l}");
    assert_eq!(l["method"], method, "{l}");
    assert_eq!(l["path"], path, "{l}");
    assert_eq!(l["status"], status, "{l}");
    assert!(l["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{l}");
    match error {
        None => {
            assert!(l.get("error_type").is_none(), "{l}");
            assert!(l.get("error_code").is_none(), "{l}");
        }
        Some((kind, code)) => {
            assert_eq!(l["error_type"], kind, "{l}");
            assert_eq!(l.get("error_code").cloned(), code.map(|c| json!(c)), "{l}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_line_and_no_secret() {
    captured();
    std::env::set_var("TANDEM_TEST_LARGE_KEY", UPSTREAM_KEY);
    std::env::set_var("TANDEM_TEST_LOG_KEYS", CLIENT_KEY);
    let (small, s_url) = mock(reply(|_| ("the answer is 4".into(), -0.1))).await;
    let (large, l_url) = mock(reply(|_| ("the answer is 4".into(), -0.1))).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[server]\napi_keys_env = \"TANDEM_TEST_LOG_KEYS\"\nmax_body_bytes = 4096\n{}\
         [[route]]\nname = \"tandem\"\nkind = \"fixed\"\nupstream = \"large\"\n\
         [[route]]\nname = \"slow\"\nkind = \"fixed\"\nupstream = \"small\"\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let c = reqwest::Client::new();
    let chat = |body: Value, key: Option<&str>| {
        let mut r = c
            .post(format!("{}/v1/chat/completions", gw.url))
            .json(&body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    let chat_path = "/v1/chat/completions";
    let mut n = 0;

    // 200, whole.
    let r = chat(chat_body("tandem", PROMPT), Some(CLIENT_KEY))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    n += 1;
    let l = line(n).await;
    check(&l, "POST", chat_path, 200, None);
    assert_eq!(l["route"], "tandem", "{l}");
    assert_eq!(l["tier"], "large", "{l}");
    assert_eq!(l["role"], v["tandem"]["role"], "{l}");
    assert_eq!(l["id"], v["id"], "{l}");
    assert!(l["id"].as_str().unwrap().starts_with("chatcmpl-"), "{l}");
    assert!(l["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{l}");
    assert_eq!(l["stream"], false, "{l}");
    assert!(l.get("complete").is_none(), "{l}");

    // 200, streamed: the line comes at the stream's end, with its id and cost.
    let mut body = chat_body("tandem", PROMPT);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = chat(body.clone(), Some(CLIENT_KEY)).await.unwrap();
    assert_eq!(r.status(), 200);
    let sse = r.text().await.unwrap();
    assert!(sse.contains("[DONE]"), "{sse}");
    n += 1;
    let l = line(n).await;
    check(&l, "POST", chat_path, 200, None);
    assert_eq!(l["stream"], true, "{l}");
    assert_eq!(l["complete"], true, "{l}");
    assert_eq!(l["route"], "tandem", "{l}");
    assert_eq!(l["tier"], "large", "{l}");
    assert!(l["id"].as_str().is_some_and(|id| sse.contains(id)), "{l}");
    assert!(l["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{l}");

    // 404: an unknown route, an unknown path.
    let r = chat(chat_body("nope", PROMPT), Some(CLIENT_KEY))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    n += 1;
    check(
        &line(n).await,
        "POST",
        chat_path,
        404,
        Some(("invalid_request_error", Some("model_not_found"))),
    );
    let r = c
        .get(format!("{}/v1/nowhere?api_key={CLIENT_KEY}", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    n += 1;
    // The path only: a query string may carry anything.
    check(
        &line(n).await,
        "GET",
        "/v1/nowhere",
        404,
        Some(("invalid_request_error", None)),
    );

    // 401: no key, a wrong key.
    for key in [None, Some(WRONG_KEY)] {
        let r = chat(chat_body("tandem", PROMPT), key).await.unwrap();
        assert_eq!(r.status(), 401);
        n += 1;
        check(
            &line(n).await,
            "POST",
            chat_path,
            401,
            Some(("authentication_error", Some("invalid_api_key"))),
        );
    }

    // 413.
    let big = chat_body("tandem", &format!("{PROMPT} {}", "x".repeat(8192)));
    let r = chat(big, Some(CLIENT_KEY)).await.unwrap();
    assert_eq!(r.status(), 413);
    n += 1;
    check(
        &line(n).await,
        "POST",
        chat_path,
        413,
        Some(("invalid_request_error", Some("request_too_large"))),
    );

    // 502: the upstream fails.
    large.mode.store(FAIL_500, Ordering::SeqCst);
    let r = chat(chat_body("tandem", PROMPT), Some(CLIENT_KEY))
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    n += 1;
    let l = line(n).await;
    check(&l, "POST", chat_path, 502, Some(("upstream_error", None)));
    assert_eq!(l["route"], "tandem", "{l}");
    large.mode.store(OK, Ordering::SeqCst);

    // 405, and a GET that succeeds.
    let r = c
        .get(format!("{}{chat_path}", gw.url))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    n += 1;
    check(
        &line(n).await,
        "GET",
        chat_path,
        405,
        Some(("invalid_request_error", None)),
    );
    let r = c
        .get(format!("{}/v1/models/tandem", gw.url))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    n += 1;
    check(&line(n).await, "GET", "/v1/models/tandem", 200, None);

    // A stream the client walks away from: still one line, marked incomplete.
    small.chunk_delay_ms.store(300, Ordering::SeqCst);
    let mut body = chat_body("slow", PROMPT);
    body["stream"] = json!(true);
    let mut r = chat(body, Some(CLIENT_KEY)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.chunk().await.unwrap().is_some());
    drop(r);
    n += 1;
    let l = line(n).await;
    check(&l, "POST", chat_path, 200, None);
    assert_eq!(l["stream"], true, "{l}");
    assert_eq!(l["complete"], false, "{l}");
    assert_eq!(l["route"], "slow", "{l}");
    small.chunk_delay_ms.store(0, Ordering::SeqCst);

    // A stream whose upstream stops mid-way: 200 already sent, the error is in the line.
    small.mode.store(CUT, Ordering::SeqCst);
    let mut body = chat_body("slow", PROMPT);
    body["stream"] = json!(true);
    let r = chat(body, Some(CLIENT_KEY)).await.unwrap();
    assert_eq!(r.status(), 200);
    let sse = r.text().await.unwrap();
    assert!(sse.contains("\"error\""), "{sse}");
    n += 1;
    let l = line(n).await;
    assert_eq!(l["status"], 200, "{l}");
    assert_eq!(l["complete"], true, "{l}");
    assert!(l["error_type"].as_str().is_some(), "{l}");
    // Its reservation stays charged, and the line says so.
    assert!(l["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{l}");
    small.mode.store(OK, Ordering::SeqCst);

    // A client that gives up before the answer: logged all the same, as 499.
    small.delay_ms.store(1_000, Ordering::SeqCst);
    let r = c
        .post(format!("{}{chat_path}", gw.url))
        .bearer_auth(CLIENT_KEY)
        .json(&chat_body("slow", PROMPT))
        .timeout(Duration::from_millis(150))
        .send()
        .await;
    assert!(r.is_err_and(|e| e.is_timeout()));
    n += 1;
    let l = line(n).await;
    assert_eq!(l["status"], 499, "{l}");
    assert_eq!(l["complete"], false, "{l}");
    assert_eq!(l["route"], "slow", "{l}");
    assert!(
        l["latency_ms"].as_f64().is_some_and(|ms| ms >= 100.0),
        "{l}"
    );
    small.delay_ms.store(0, Ordering::SeqCst);

    gw.stop().await;
    assert_eq!(request_lines().len(), n);
    let all = text();
    for secret in [
        PROMPT,
        "PROMPT-SECRET",
        CLIENT_KEY,
        WRONG_KEY,
        UPSTREAM_KEY,
        "SECRET",
    ] {
        assert!(!all.contains(secret), "{secret} was logged:\n{all}");
    }
}
