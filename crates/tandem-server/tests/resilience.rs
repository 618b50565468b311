//! Resilience (upstream groups): a failed call moves to the next upstream of its group, a lone
//! upstream is retried after its backoff or its `Retry-After`, the request's own faults get one
//! call, an upstream that cannot serve is left for the others, streams fail over until their first
//! piece of answer, circuit breakers open and close, weights draw the first upstream, concurrency
//! limits send the overflow elsewhere, one budget reservation covers every attempt, and bad group
//! settings are refused naming their field — each against scripted mock upstreams whose calls are
//! counted exactly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_server::resilience::Group;
use tandem_server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Config builders
// ---------------------------------------------------------------------------------------------

/// An openai upstream `name` at `url`; `extra` holds its other settings (keys first, then its
/// `[upstream.retry]` / `[upstream.breaker]` tables).
fn up(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[upstream]]\nname = \"{name}\"\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"{name}-model\"\n{extra}\n"
    )
}

/// A breaker that stays closed through the many failures a test sends on purpose.
const CALM: &str = "[upstream.breaker]\nconsecutive_failures = 1000\nmin_calls = 1000\n";

/// A fixed route over `group`, a TOML value (`"a"`, `["a", "b"]`, `[{ upstream = "a", ... }]`).
fn fixed(name: &str, group: &str, extra: &str) -> String {
    format!("[[route]]\nname = \"{name}\"\nkind = \"fixed\"\nupstream = {group}\n{extra}\n")
}

/// A mock answering "answer from NAME" (usage: prompt/4 + 1 input tokens, one per word output).
async fn answering(name: &str) -> (Arc<Mock>, String) {
    let text = format!("answer from {name}");
    mock(reply(move |_| (text.clone(), -0.1))).await
}

/// A whole answer of `text` billed 1,000 input and 500 output tokens (streamed too).
fn billed(text: &str) -> Scripted {
    Scripted::Answer {
        message: json!({"role": "assistant", "content": text}),
        finish_reason: json!("stop"),
        logprobs: Value::Null,
        usage: Some(json!({"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500})),
        extra: json!({}),
    }
}

fn err_body(message: &str, kind: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "code": null, "param": null}})
}

fn status(code: u16) -> Scripted {
    Scripted::error(code, err_body(&format!("mock says {code}"), "server_error"))
}

fn with_retry_after(code: u16, after: &str) -> Scripted {
    Scripted::Json {
        status: code,
        headers: vec![("retry-after".into(), after.into())],
        body: err_body("slow down", "requests"),
    }
}

fn raw(status: u16, body: &str) -> Scripted {
    Scripted::Raw {
        status,
        headers: vec![],
        body: body.into(),
    }
}

/// A stream chunk with this delta (and finish reason).
fn chunk(delta: Value, finish: Value) -> String {
    json!({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    .to_string()
}

fn role_chunk() -> String {
    chunk(json!({"role": "assistant"}), Value::Null)
}

fn content_chunk(text: &str) -> String {
    chunk(json!({"content": text}), Value::Null)
}

// ---------------------------------------------------------------------------------------------
// A bare HTTP upstream, for failures axum will not produce: a body cut short by a closed
// connection, or a connection closed with no answer at all.
// ---------------------------------------------------------------------------------------------

/// Reads one HTTP/1.1 request whole (headers and `content-length` body); false if the peer left.
async fn read_request(s: &mut tokio::net::TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut piece = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return true;
            }
        }
        match s.read(&mut piece).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&piece[..n]),
        }
    }
}

/// An upstream that reads each request, writes `reply` as is and closes the connection; it
/// counts the requests. Returns the count and its base URL.
async fn raw_upstream(reply: &'static str) -> (Arc<AtomicUsize>, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                if read_request(&mut s).await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let _ = s.write_all(reply.as_bytes()).await;
                    let _ = s.flush().await;
                }
            });
        }
    });
    (calls, format!("http://{addr}/v1"))
}

/// A 200 whose `content-length` promises 400 bytes; the connection closes after 50.
const CUT_CONNECTION: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\nconnection: close\r\n\r\n{\"id\":\"x\",\"choices\":[{\"message\":{\"content\":\"hal";

// ---------------------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------------------

struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
    body: Value,
}

impl Resp {
    fn h(&self, k: &str) -> Option<String> {
        self.headers.get(k).map(|v| v.to_str().unwrap().to_string())
    }

    /// A stream's data events (the JSON ones) and whether `[DONE]` ended it.
    fn sse(&self) -> (Vec<Value>, bool) {
        let mut events = Vec::new();
        let mut done = false;
        for line in self.text.lines() {
            if let Some(d) = line.strip_prefix("data:") {
                let d = d.trim();
                if d == "[DONE]" {
                    done = true;
                } else {
                    events.push(
                        serde_json::from_str(d).unwrap_or_else(|e| panic!("bad event {d}: {e}")),
                    );
                }
            }
        }
        (events, done)
    }
}

async fn send(url: &str, body: &Value) -> Resp {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        text,
        body,
    }
}

fn req(route: &str, text: &str) -> Value {
    json!({"model": route, "messages": [{"role": "user", "content": text}]})
}

/// Streamed, with the usage chunk (which carries the `tandem` field).
fn streamed(mut b: Value) -> Value {
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    b
}

fn content_of(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

fn error_events(events: &[Value]) -> Vec<&Value> {
    events.iter().filter(|e| e.get("error").is_some()).collect()
}

/// What a successful answer says of how it was served: (tier, tried, content). For a stream
/// also checks it is one clean stream: one role delta, no error event, `[DONE]`.
#[track_caller]
fn served(r: &Resp, stream: bool, what: &str) -> (String, u64, String) {
    assert_eq!(r.status, 200, "{what}: {}", r.text);
    let header_tier = r.h("x-tandem-tier").unwrap_or_default();
    if !stream {
        let t = &r.body["tandem"];
        assert_eq!(t["tier"].as_str(), Some(header_tier.as_str()), "{what}");
        return (
            header_tier,
            t["tried"].as_u64().unwrap(),
            r.body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    let (events, done) = r.sse();
    assert!(done, "{what}: the stream ends with [DONE]: {}", r.text);
    assert!(
        error_events(&events).is_empty(),
        "{what}: no error event: {}",
        r.text
    );
    let roles = events
        .iter()
        .filter(|c| c["choices"][0]["delta"]["role"].is_string())
        .count();
    assert_eq!(roles, 1, "{what}: one role delta: {}", r.text);
    let tandem = events
        .iter()
        .find_map(|e| e.get("tandem"))
        .unwrap_or_else(|| panic!("{what}: no tandem field in {}", r.text));
    assert_eq!(
        tandem["tier"].as_str(),
        Some(header_tier.as_str()),
        "{what}"
    );
    (
        header_tier,
        tandem["tried"].as_u64().unwrap(),
        content_of(&events),
    )
}

async fn health(url: &str) -> Value {
    reqwest::get(format!("{url}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The value of the gauge `tandem_upstream_breaker_state{upstream="NAME"}` in `/metrics`.
async fn breaker_gauge(url: &str, name: &str) -> Option<f64> {
    let r = reqwest::get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(r.status(), 200, "/metrics is served in-process");
    let text = r.text().await.unwrap();
    let key = format!("tandem_upstream_breaker_state{{upstream=\"{name}\"}}");
    text.lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .map(|v| v.trim().parse().unwrap())
}

// ---------------------------------------------------------------------------------------------
// 1. Whole-call failover
// ---------------------------------------------------------------------------------------------

/// Group [a, b]: every transient failure of a (5xx, 429 with a short Retry-After, garbage, a body
/// cut short, a closed connection, a timeout) moves the call to b at once — plain and streamed:
/// a called once, b once, `tier` b, `tried` 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_moves_to_the_next_upstream_of_the_group() {
    let (a, a_url) = answering("a").await;
    let (b, b_url) = answering("b").await;
    let (cut, cut_url) = raw_upstream(CUT_CONNECTION).await;
    let (closed, closed_url) = raw_upstream("").await;
    let quick = format!("timeout_ms = 300\n{CALM}");
    let cfg = [
        up("a", &a_url, &quick),
        up("b", &b_url, CALM),
        up("cut", &cut_url, &quick),
        up("closed", &closed_url, &quick),
        fixed("ab", r#"["a", "b"]"#, ""),
        fixed("cut_b", r#"["cut", "b"]"#, ""),
        fixed("closed_b", r#"["closed", "b"]"#, ""),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    let failures: Vec<(&str, Option<Scripted>)> = vec![
        ("500", Some(status(500))),
        ("502", Some(status(502))),
        ("503", Some(status(503))),
        ("429 Retry-After 1", Some(with_retry_after(429, "1"))),
        ("429 Retry-After 60", Some(with_retry_after(429, "60"))),
        ("503 Retry-After 60", Some(with_retry_after(503, "60"))),
        ("garbage", Some(raw(200, "{\"choices\": [oops"))),
        (
            "truncated JSON",
            Some(raw(
                200,
                "{\"id\":\"x\",\"object\":\"chat.completion\",\"choices\":[{\"message\":{\"content\":\"hal",
            )),
        ),
        // Last, in both modes: a slow call's handler may outlive the gateway's timeout, and
        // must find no script left to take.
        ("timeout", None),
    ];
    let modes = failures
        .iter()
        .map(|(what, fail)| (*what, fail, false))
        .chain(failures.iter().map(|(what, fail)| (*what, fail, true)));
    let (timeouts, scripted): (Vec<_>, Vec<_>) = modes.partition(|(_, fail, _)| fail.is_none());
    for (what, fail, stream) in scripted.into_iter().chain(timeouts) {
        let what = format!("{what} stream={stream}");
        let (na, nb) = (a.calls(), b.calls());
        match fail {
            Some(f) => a.push(f.clone()),
            None => a.delay_ms.store(700, Ordering::SeqCst),
        }
        let body = req("ab", "hello");
        let r = send(&gw.url, &if stream { streamed(body) } else { body }).await;
        a.delay_ms.store(0, Ordering::SeqCst);
        let (tier, tried, content) = served(&r, stream, &what);
        assert_eq!(
            (tier.as_str(), tried, content.as_str()),
            ("b", 2, "answer from b"),
            "{what}"
        );
        assert_eq!(
            (a.calls() - na, b.calls() - nb),
            (1, 1),
            "{what}: a once, b once"
        );
    }
    // A connection closed mid-body or with no answer at all.
    for stream in [false, true] {
        for (route, count, what) in [("cut_b", &cut, "cut body"), ("closed_b", &closed, "closed")] {
            let what = format!("{what} stream={stream}");
            let (nr, nb) = (count.load(Ordering::SeqCst), b.calls());
            let body = req(route, "hello");
            let r = send(&gw.url, &if stream { streamed(body) } else { body }).await;
            let (tier, tried, content) = served(&r, stream, &what);
            assert_eq!(
                (tier.as_str(), tried, content.as_str()),
                ("b", 2, "answer from b"),
                "{what}"
            );
            assert_eq!(
                (count.load(Ordering::SeqCst) - nr, b.calls() - nb),
                (1, 1),
                "{what}: the failing upstream once, b once"
            );
        }
    }
    // A healthy a serves alone: b is only the second choice.
    let (na, nb) = (a.calls(), b.calls());
    let (tier, tried, _) = served(&send(&gw.url, &req("ab", "hi")).await, false, "healthy");
    assert_eq!((tier.as_str(), tried), ("a", 1));
    assert_eq!((a.calls() - na, b.calls() - nb), (1, 0));
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Retries on one upstream
// ---------------------------------------------------------------------------------------------

/// A lone upstream is retried after its backoff: each transient failure then a success is two
/// calls and a 200; two failures are two calls (the default attempts) and the error; attempts = 3
/// allows a third. A `Retry-After` within `max_retry_after_ms` is waited for; a longer one (in
/// seconds or as a date, or over a lowered `max_retry_after_ms`) is not retried, and reaches the
/// client with its `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_upstream_is_retried_after_its_backoff_or_retry_after() {
    let (solo, solo_url) = answering("solo").await;
    let (trio, trio_url) = answering("trio").await;
    let (strict, strict_url) = answering("strict").await;
    let (slow, slow_url) = answering("slow").await;
    let cfg = [
        up("solo", &solo_url, &format!("timeout_ms = 2000\n{CALM}")),
        up(
            "trio",
            &trio_url,
            &format!("[upstream.retry]\nattempts = 3\nbackoff_ms = 20\n{CALM}"),
        ),
        up(
            "strict",
            &strict_url,
            &format!("[upstream.retry]\nmax_retry_after_ms = 500\n{CALM}"),
        ),
        up(
            "slow",
            &slow_url,
            &format!("[upstream.retry]\nattempts = 3\nbackoff_ms = 300\n{CALM}"),
        ),
        fixed("solo", "\"solo\"", ""),
        fixed("trio", "[\"trio\"]", ""),
        fixed("slow", "\"slow\"", ""),
        fixed("strict", "\"strict\"", ""),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    let transient: Vec<(&str, Scripted)> = vec![
        ("500", status(500)),
        ("502", status(502)),
        ("503", status(503)),
        ("504", status(504)),
        ("408", Scripted::error(408, err_body("timeout", "timeout"))),
        (
            "409",
            Scripted::error(409, err_body("conflict", "conflict")),
        ),
        (
            "429",
            Scripted::error(429, err_body("slow down", "requests")),
        ),
        ("garbage", raw(200, "not json at all")),
        (
            "no choices",
            Scripted::json(json!({"id": "x", "choices": []})),
        ),
    ];
    for stream in [false, true] {
        for (what, fail) in &transient {
            let what = format!("{what} then success, stream={stream}");
            let n = solo.calls();
            solo.push(fail.clone());
            let body = req("solo", "hello");
            let r = send(&gw.url, &if stream { streamed(body) } else { body }).await;
            let (tier, tried, content) = served(&r, stream, &what);
            assert_eq!(
                (tier.as_str(), tried, content.as_str()),
                ("solo", 2, "answer from solo"),
                "{what}"
            );
            assert_eq!(solo.calls() - n, 2, "{what}: two calls");
        }
    }
    // Two failures: the default two attempts are spent, the last error reaches the client.
    for (first, second, want) in [(500, 503, 502), (503, 429, 429), (429, 502, 502)] {
        let n = solo.calls();
        solo.push(status(first));
        solo.push(status(second));
        let r = send(&gw.url, &req("solo", "hello")).await;
        assert_eq!(r.status, want, "{first} then {second}: {}", r.text);
        assert_eq!(solo.calls() - n, 2, "{first} then {second}: two attempts");
    }
    // attempts = 3: two failures still end in an answer; three do not.
    let n = trio.calls();
    trio.push(status(500));
    trio.push(status(503));
    let (tier, tried, _) = served(&send(&gw.url, &req("trio", "x")).await, false, "trio");
    assert_eq!((tier.as_str(), tried), ("trio", 3));
    assert_eq!(trio.calls() - n, 3);
    let n = trio.calls();
    for _ in 0..3 {
        trio.push(status(500));
    }
    let r = send(&gw.url, &req("trio", "x")).await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert_eq!(trio.calls() - n, 3, "three attempts, no fourth");
    // The backoff doubles: 300 ms then 600 ms, each drawn from its upper half, so two failures
    // then a success take at least 150 + 300 ms (a lower bound only).
    let n = slow.calls();
    slow.push(status(500));
    slow.push(status(500));
    let t0 = Instant::now();
    let (tier, tried, _) = served(&send(&gw.url, &req("slow", "x")).await, false, "backoff");
    let waited = t0.elapsed();
    assert_eq!((tier.as_str(), tried), ("slow", 3));
    assert_eq!(slow.calls() - n, 3);
    assert!(
        waited >= Duration::from_millis(440),
        "backoff 150..300 + 300..600 ms, waited {waited:?}"
    );
    // Retry-After: 1 is waited for (a lower bound only: the box may be slow, never fast).
    let n = solo.calls();
    solo.push(with_retry_after(429, "1"));
    let t0 = Instant::now();
    let (tier, tried, _) = served(
        &send(&gw.url, &req("solo", "x")).await,
        false,
        "Retry-After 1",
    );
    let waited = t0.elapsed();
    assert_eq!((tier.as_str(), tried), ("solo", 2));
    assert_eq!(solo.calls() - n, 2);
    assert!(
        waited >= Duration::from_millis(900),
        "Retry-After: 1 honoured, waited {waited:?}"
    );
    // Longer than max_retry_after_ms (5 s by default, 500 ms on `strict`): no retry, and the
    // client sees the upstream's answer with its Retry-After.
    let in_2_min = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
    let long: Vec<(&str, &str, Scripted, u16, &str)> = vec![
        ("429 60 s", "solo", with_retry_after(429, "60"), 429, "60"),
        (
            "429 date",
            "solo",
            with_retry_after(429, &in_2_min),
            429,
            &in_2_min,
        ),
        ("503 60 s", "solo", with_retry_after(503, "60"), 502, "60"),
        (
            "429 1 s over 500 ms",
            "strict",
            with_retry_after(429, "1"),
            429,
            "1",
        ),
    ];
    for stream in [false, true] {
        for (what, route, fail, want, after) in &long {
            let what = format!("{what} stream={stream}");
            let m = if *route == "solo" { &solo } else { &strict };
            let n = m.calls();
            m.push(fail.clone());
            let body = req(route, "x");
            let r = send(&gw.url, &if stream { streamed(body) } else { body }).await;
            assert_eq!(r.status, *want, "{what}: {}", r.text);
            assert_eq!(r.h("retry-after").as_deref(), Some(*after), "{what}");
            assert_eq!(m.calls() - n, 1, "{what}: not retried");
        }
    }
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. The request's own fault
// ---------------------------------------------------------------------------------------------

/// 400, 413 and 422 say the request is wrong: no other upstream would do better, so a is called
/// once, b never, and the client gets a's status and message — even with attempts to spare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_requests_own_fault_is_not_retried_nor_moved() {
    let (a, a_url) = answering("a").await;
    let (b, b_url) = answering("b").await;
    let cfg = [
        up(
            "a",
            &a_url,
            &format!("[upstream.retry]\nattempts = 3\n{CALM}"),
        ),
        up("b", &b_url, CALM),
        fixed("ab", r#"["a", "b"]"#, ""),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    for stream in [false, true] {
        for code in [400u16, 413, 422] {
            let what = format!("{code} stream={stream}");
            let (na, nb) = (a.calls(), b.calls());
            a.push(Scripted::error(
                code,
                json!({"error": {"message": format!("bad request {code}"), "type": "invalid_request_error", "param": "messages", "code": null}}),
            ));
            let body = req("ab", "hello");
            let r = send(&gw.url, &if stream { streamed(body) } else { body }).await;
            assert_eq!(r.status, code, "{what}: {}", r.text);
            let message = r.body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(&format!("bad request {code}")),
                "{what}: {message}"
            );
            assert_eq!(r.body["error"]["type"], "invalid_request_error", "{what}");
            assert_eq!(
                (a.calls() - na, b.calls() - nb),
                (1, 0),
                "{what}: a once, b never"
            );
        }
    }
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. An upstream that cannot serve this request
// ---------------------------------------------------------------------------------------------

/// 401, 403, 404 and 501 say this upstream cannot serve (its key, its model, its features): it
/// is not retried even with attempts = 3, and the next upstream serves. Alone in its group, its
/// error reaches the client after one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_cannot_serve_is_left_for_the_others() {
    let (a, a_url) = answering("a").await;
    let (b, b_url) = answering("b").await;
    let cfg = [
        up(
            "a",
            &a_url,
            &format!("[upstream.retry]\nattempts = 3\nbackoff_ms = 10\n{CALM}"),
        ),
        up("b", &b_url, CALM),
        fixed("ab", r#"["a", "b"]"#, ""),
        fixed("only_a", "\"a\"", ""),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    let elsewhere: Vec<(u16, Scripted, u16)> = vec![
        (
            401,
            Scripted::error(401, err_body("bad key", "authentication_error")),
            401,
        ),
        (
            403,
            Scripted::error(403, err_body("forbidden", "permission_error")),
            403,
        ),
        (
            404,
            Scripted::error(404, err_body("no such model", "invalid_request_error")),
            404,
        ),
        (501, status(501), 502),
    ];
    for stream in [false, true] {
        for (code, fail, _) in &elsewhere {
            let what = format!("{code} stream={stream}");
            let (na, nb) = (a.calls(), b.calls());
            a.push(fail.clone());
            let body = req("ab", "hello");
            let r = send(&gw.url, &if stream { streamed(body) } else { body }).await;
            let (tier, tried, content) = served(&r, stream, &what);
            assert_eq!(
                (tier.as_str(), tried, content.as_str()),
                ("b", 2, "answer from b"),
                "{what}"
            );
            assert_eq!(
                (a.calls() - na, b.calls() - nb),
                (1, 1),
                "{what}: a once despite attempts = 3"
            );
        }
        for (code, fail, want) in &elsewhere {
            let what = format!("{code} alone, stream={stream}");
            let n = a.calls();
            a.push(fail.clone());
            let body = req("only_a", "hello");
            let r = send(&gw.url, &if stream { streamed(body) } else { body }).await;
            assert_eq!(r.status, *want, "{what}: {}", r.text);
            assert_eq!(a.calls() - n, 1, "{what}: not retried");
        }
    }
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Streams
// ---------------------------------------------------------------------------------------------

/// A stream fails over until its first piece of answer: a stream that ends after the role chunk,
/// a 5xx or 429, garbage or an upstream error event before any content, a first-token timeout —
/// the client gets one clean stream from b. Once content has gone out, a failure is the client's
/// to see: the content, then an OpenAI error event, and b is never called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_fail_over_until_their_first_piece_of_answer() {
    let (a, a_url) = answering("a").await;
    let (b, b_url) = answering("b").await;
    let cfg = [
        up(
            "a",
            &a_url,
            &format!(
                "timeout_ms = 2000\nfirst_token_timeout_ms = 300\nidle_timeout_ms = 300\n{CALM}"
            ),
        ),
        up("b", &b_url, CALM),
        fixed("ab", r#"["a", "b"]"#, ""),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    let upstream_error =
        json!({"error": {"message": "overloaded", "type": "server_error"}}).to_string();
    let before_answer: Vec<(&str, Scripted)> = vec![
        (
            "role chunk only, no [DONE]",
            Scripted::Sse {
                chunks: vec![role_chunk()],
                delay_ms: 0,
            },
        ),
        (
            "OpenAI's opening chunk (role, empty content), no [DONE]",
            Scripted::Sse {
                chunks: vec![chunk(
                    json!({"role": "assistant", "content": "", "refusal": null}),
                    Value::Null,
                )],
                delay_ms: 0,
            },
        ),
        (
            "opening chunk with empty tool_calls, then garbage",
            Scripted::Sse {
                chunks: vec![
                    chunk(
                        json!({"role": "assistant", "content": "", "tool_calls": []}),
                        Value::Null,
                    ),
                    "{oops".into(),
                ],
                delay_ms: 0,
            },
        ),
        (
            "no chunk at all",
            Scripted::Sse {
                chunks: vec![],
                delay_ms: 0,
            },
        ),
        ("500", status(500)),
        ("503", status(503)),
        (
            "429",
            Scripted::error(429, err_body("slow down", "requests")),
        ),
        (
            "garbage after the role",
            Scripted::Sse {
                chunks: vec![role_chunk(), "{oops".into()],
                delay_ms: 0,
            },
        ),
        (
            "error event after the role",
            Scripted::Sse {
                chunks: vec![role_chunk(), upstream_error.clone()],
                delay_ms: 0,
            },
        ),
        (
            "first-token timeout",
            Scripted::SseTimed {
                chunks: vec![
                    (0, role_chunk()),
                    (900, content_chunk("late")),
                    (0, "[DONE]".into()),
                ],
            },
        ),
    ];
    for (what, fail) in &before_answer {
        let (na, nb) = (a.calls(), b.calls());
        a.push(fail.clone());
        let r = send(&gw.url, &streamed(req("ab", "hello"))).await;
        let (tier, tried, content) = served(&r, true, what);
        assert_eq!(
            (tier.as_str(), tried, content.as_str()),
            ("b", 2, "answer from b"),
            "{what}"
        );
        assert_eq!(
            (a.calls() - na, b.calls() - nb),
            (1, 1),
            "{what}: a once, b once"
        );
    }
    // Content went out: no failover, an error event ends the stream.
    let after_answer: Vec<(&str, Scripted, Option<&str>)> = vec![
        (
            "cut after content",
            Scripted::Sse {
                chunks: vec![role_chunk(), content_chunk("Hel")],
                delay_ms: 0,
            },
            None,
        ),
        (
            "garbage after content",
            Scripted::Sse {
                chunks: vec![role_chunk(), content_chunk("Hel"), "{oops".into()],
                delay_ms: 0,
            },
            None,
        ),
        (
            "error event after content",
            Scripted::Sse {
                chunks: vec![role_chunk(), content_chunk("Hel"), upstream_error],
                delay_ms: 0,
            },
            None,
        ),
        (
            "idle timeout after content",
            Scripted::SseTimed {
                chunks: vec![
                    (0, role_chunk()),
                    (0, content_chunk("Hel")),
                    (900, content_chunk("lo")),
                    (0, "[DONE]".into()),
                ],
            },
            Some("upstream_timeout"),
        ),
    ];
    for (what, fail, code) in &after_answer {
        let (na, nb) = (a.calls(), b.calls());
        a.push(fail.clone());
        let r = send(&gw.url, &streamed(req("ab", "hello"))).await;
        assert_eq!(r.status, 200, "{what}: {}", r.text);
        assert_eq!(r.h("x-tandem-tier").as_deref(), Some("a"), "{what}");
        let (events, done) = r.sse();
        assert_eq!(content_of(&events), "Hel", "{what}: {}", r.text);
        assert!(!done, "{what}: no [DONE] after an error: {}", r.text);
        let errors = error_events(&events);
        assert_eq!(errors.len(), 1, "{what}: one error event: {}", r.text);
        assert!(
            events.last().unwrap().get("error").is_some(),
            "{what}: the error event is last"
        );
        let e = &errors[0]["error"];
        assert!(
            e["message"].is_string() && e["type"].is_string(),
            "{what}: {e}"
        );
        if let Some(code) = code {
            assert_eq!(e["code"], *code, "{what}: {e}");
        }
        assert_eq!(
            (a.calls() - na, b.calls() - nb),
            (1, 0),
            "{what}: no failover after content"
        );
    }
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Circuit breakers
// ---------------------------------------------------------------------------------------------

/// Breakers: failures in a row, or an error rate over the window, open an upstream's breaker
/// and requests skip it (its calls stop growing) — `/health` and `/metrics` show it; after
/// `open_ms` a probe decides (a failed one opens it again, a good one closes it); a group whose
/// every breaker is open is answered 503 `upstream_unavailable` with a `Retry-After`, and
/// `/health` says `degraded`. Upstream names are this test's own: the gauge is process-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakers_open_on_failures_skip_the_upstream_and_close_after_a_probe() {
    let (brk_a, brk_a_url) = answering("brk_a").await;
    let (brk_b, brk_b_url) = answering("brk_b").await;
    let (rate_a, rate_a_url) = answering("rate_a").await;
    let (probe_a, probe_a_url) = answering("probe_a").await;
    let (lonely, lonely_url) = answering("lonely").await;
    let (pair_x, pair_x_url) = answering("pair_x").await;
    let (pair_y, pair_y_url) = answering("pair_y").await;
    let (frail, frail_url) = answering("frail").await;
    let once = "[upstream.retry]\nattempts = 1\n";
    let cfg = [
        up(
            "brk_a",
            &brk_a_url,
            "[upstream.breaker]\nconsecutive_failures = 3\nopen_ms = 60000\n",
        ),
        up("brk_b", &brk_b_url, CALM),
        up(
            "rate_a",
            &rate_a_url,
            "[upstream.breaker]\nconsecutive_failures = 100\nerror_rate = 0.5\nmin_calls = 4\nopen_ms = 60000\n",
        ),
        up(
            "probe_a",
            &probe_a_url,
            "[upstream.breaker]\nconsecutive_failures = 2\nopen_ms = 300\n",
        ),
        up(
            "lonely",
            &lonely_url,
            &format!("{once}[upstream.breaker]\nconsecutive_failures = 2\nopen_ms = 60000\n"),
        ),
        up(
            "pair_x",
            &pair_x_url,
            &format!("{once}[upstream.breaker]\nconsecutive_failures = 1\nopen_ms = 60000\n"),
        ),
        up(
            "pair_y",
            &pair_y_url,
            &format!("{once}[upstream.breaker]\nconsecutive_failures = 1\nopen_ms = 60000\n"),
        ),
        fixed("brk", r#"["brk_a", "brk_b"]"#, ""),
        fixed("rate", r#"["rate_a", "brk_b"]"#, ""),
        fixed("probe", r#"["probe_a", "brk_b"]"#, ""),
        fixed("lonely", r#""lonely""#, ""),
        fixed("pair", r#"["pair_x", "pair_y"]"#, ""),
        up(
            "frail",
            &frail_url,
            "[upstream.breaker]\nconsecutive_failures = 2\nopen_ms = 60000\n",
        ),
        fixed("frail", r#"["frail", "brk_b"]"#, ""),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    let h = health(&gw.url).await;
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["upstreams"]["brk_a"]["breaker"], "closed", "{h}");

    // Three failures in a row open brk_a's breaker; each of those requests was served by brk_b.
    brk_a.set_always(Some(status(500)));
    for i in 0..3 {
        let (tier, tried, _) = served(&send(&gw.url, &req("brk", "x")).await, false, "opening");
        assert_eq!((tier.as_str(), tried), ("brk_b", 2), "request {i}");
        assert_eq!(brk_a.calls(), i + 1);
    }
    let h = health(&gw.url).await;
    assert_eq!(h["upstreams"]["brk_a"]["breaker"], "open", "{h}");
    assert_eq!(h["upstreams"]["brk_b"]["breaker"], "closed", "{h}");
    assert_eq!(h["status"], "ok", "brk_b still serves the route: {h}");
    assert_eq!(breaker_gauge(&gw.url, "brk_a").await, Some(2.0));
    assert_eq!(breaker_gauge(&gw.url, "brk_b").await, Some(0.0));
    // Open: straight to brk_b, brk_a's calls stop growing (plain and streamed).
    let nb = brk_b.calls();
    for stream in [false, false, false, true, true] {
        let body = req("brk", "x");
        let r = send(&gw.url, &if stream { streamed(body) } else { body }).await;
        let (tier, tried, _) = served(&r, stream, "open");
        assert_eq!((tier.as_str(), tried), ("brk_b", 1), "stream={stream}");
    }
    assert_eq!(brk_a.calls(), 3, "an open breaker is skipped");
    assert_eq!(brk_b.calls() - nb, 5);

    // The error rate: fail, ok, fail, ok stays closed (min_calls 4, then 2 of 4 failed but the
    // last call succeeded); a third failure in five calls opens it.
    for (i, ok) in [false, true, false, true].into_iter().enumerate() {
        rate_a.push(if ok {
            Scripted::text("ok")
        } else {
            status(503)
        });
        let (tier, _, _) = served(&send(&gw.url, &req("rate", "x")).await, false, "rate");
        assert_eq!(tier, if ok { "rate_a" } else { "brk_b" }, "call {i}");
    }
    let h = health(&gw.url).await;
    assert_eq!(h["upstreams"]["rate_a"]["breaker"], "closed", "{h}");
    rate_a.push(status(503));
    let (tier, _, _) = served(&send(&gw.url, &req("rate", "x")).await, false, "rate");
    assert_eq!(tier, "brk_b");
    assert_eq!(rate_a.calls(), 5);
    let h = health(&gw.url).await;
    assert_eq!(
        h["upstreams"]["rate_a"]["breaker"], "open",
        "3 of 5 failed: {h}"
    );
    let (tier, tried, _) = served(&send(&gw.url, &req("rate", "x")).await, false, "rate");
    assert_eq!((tier.as_str(), tried), ("brk_b", 1));
    assert_eq!(rate_a.calls(), 5, "skipped once open");

    // Probes: open_ms = 300. Real sleeps, well past it; no upper bound is asserted.
    probe_a.set_always(Some(status(500)));
    for _ in 0..2 {
        let (tier, _, _) = served(&send(&gw.url, &req("probe", "x")).await, false, "probe");
        assert_eq!(tier, "brk_b");
    }
    assert_eq!(probe_a.calls(), 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The probe fails: open again, brk_b serves.
    let (tier, tried, _) = served(&send(&gw.url, &req("probe", "x")).await, false, "probe");
    assert_eq!((tier.as_str(), tried), ("brk_b", 2), "a failed probe");
    assert_eq!(probe_a.calls(), 3, "one probe");
    let h = health(&gw.url).await;
    assert_ne!(h["upstreams"]["probe_a"]["breaker"], "closed", "{h}");
    // Healed: the next probe closes it.
    probe_a.set_always(None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (tier, tried, _) = served(&send(&gw.url, &req("probe", "x")).await, false, "probe");
    assert_eq!((tier.as_str(), tried), ("probe_a", 1), "a good probe");
    assert_eq!(probe_a.calls(), 4);
    let h = health(&gw.url).await;
    assert_eq!(h["upstreams"]["probe_a"]["breaker"], "closed", "{h}");
    assert_eq!(breaker_gauge(&gw.url, "probe_a").await, Some(0.0));
    let (tier, _, _) = served(&send(&gw.url, &req("probe", "x")).await, false, "probe");
    assert_eq!(tier, "probe_a", "closed: served again");
    assert_eq!(probe_a.calls(), 5);

    // The request's own faults are not the upstream's: five 400/422 in a row leave frail's
    // breaker (2 failures in a row) closed. Streams that die after their first content are its
    // failures: two open it, and the next stream goes to brk_b.
    for code in [400u16, 422, 400, 422, 400] {
        let nb = brk_b.calls();
        frail.push(Scripted::error(
            code,
            err_body("bad", "invalid_request_error"),
        ));
        let r = send(&gw.url, &req("frail", "x")).await;
        assert_eq!(r.status, code, "{}", r.text);
        assert_eq!(brk_b.calls(), nb, "{code}: no failover");
    }
    assert_eq!(frail.calls(), 5);
    let h = health(&gw.url).await;
    assert_eq!(h["upstreams"]["frail"]["breaker"], "closed", "{h}");
    for i in 0..2 {
        frail.push(Scripted::Sse {
            chunks: vec![role_chunk(), content_chunk("Hel")],
            delay_ms: 0,
        });
        let r = send(&gw.url, &streamed(req("frail", "x"))).await;
        let (events, _) = r.sse();
        assert_eq!(content_of(&events), "Hel", "{i}: {}", r.text);
        assert_eq!(error_events(&events).len(), 1, "{i}: {}", r.text);
    }
    assert_eq!(frail.calls(), 7);
    let h = health(&gw.url).await;
    assert_eq!(h["upstreams"]["frail"]["breaker"], "open", "{h}");
    let (tier, tried, _) = served(
        &send(&gw.url, &streamed(req("frail", "x"))).await,
        true,
        "frail open",
    );
    assert_eq!((tier.as_str(), tried), ("brk_b", 1));
    assert_eq!(frail.calls(), 7);

    // A lone upstream whose breaker is open: 503 upstream_unavailable with a Retry-After.
    lonely.set_always(Some(status(500)));
    for _ in 0..2 {
        let r = send(&gw.url, &req("lonely", "x")).await;
        assert_eq!(r.status, 502, "{}", r.text);
    }
    assert_eq!(lonely.calls(), 2);
    for stream in [false, true] {
        let body = req("lonely", "x");
        let r = send(&gw.url, &if stream { streamed(body) } else { body }).await;
        assert_eq!(r.status, 503, "stream={stream}: {}", r.text);
        assert_eq!(
            r.body["error"]["code"], "upstream_unavailable",
            "{}",
            r.text
        );
        let after: u64 = r
            .h("retry-after")
            .expect("a Retry-After header")
            .parse()
            .unwrap();
        assert!((1..=60).contains(&after), "Retry-After {after}");
    }
    assert_eq!(lonely.calls(), 2, "no call while open");
    let h = health(&gw.url).await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["upstreams"]["lonely"]["breaker"], "open", "{h}");
    assert!(
        h["routes"]["lonely"]["large_unavailable"].is_string(),
        "{h}"
    );
    assert!(h["routes"].get("brk").is_none(), "brk_b still serves: {h}");
    assert_eq!(breaker_gauge(&gw.url, "lonely").await, Some(2.0));

    // A group whose every breaker opens: the first request gets the last error, the next 503.
    pair_x.set_always(Some(status(500)));
    pair_y.set_always(Some(status(502)));
    let r = send(&gw.url, &req("pair", "x")).await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert_eq!((pair_x.calls(), pair_y.calls()), (1, 1));
    let r = send(&gw.url, &req("pair", "x")).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "upstream_unavailable");
    assert!(r.h("retry-after").is_some());
    assert_eq!((pair_x.calls(), pair_y.calls()), (1, 1));
    let h = health(&gw.url).await;
    assert!(h["routes"]["pair"]["large_unavailable"].is_string(), "{h}");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Weights
// ---------------------------------------------------------------------------------------------

/// Sends `n` requests to `route`, `par` at a time, all answered 200.
async fn burst(url: &str, route: &str, n: usize, par: usize) {
    let body = req(route, "hello");
    let mut left = n;
    while left > 0 {
        let k = left.min(par);
        let rs = futures_util::future::join_all((0..k).map(|_| send(url, &body))).await;
        for r in rs {
            assert_eq!(r.status, 200, "{}", r.text);
        }
        left -= k;
    }
}

/// Weighted groups draw their first upstream by weight: 3:1 gives a about 3/4 of first calls,
/// 1:9 about 1/10; an unweighted list always starts with its first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_groups_draw_the_first_upstream_by_weight() {
    let (a, a_url) = answering("a").await;
    let (b, b_url) = answering("b").await;
    let cfg = [
        up("a", &a_url, CALM),
        up("b", &b_url, CALM),
        fixed(
            "w31",
            r#"[{ upstream = "a", weight = 3 }, { upstream = "b", weight = 1 }]"#,
            "",
        ),
        fixed(
            "w19",
            r#"[{ upstream = "a", weight = 1 }, { upstream = "b", weight = 9 }]"#,
            "",
        ),
        fixed("ordered", r#"["b", { upstream = "a" }]"#, ""),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    for (route, n, lo, hi) in [("w31", 400usize, 0.65, 0.85), ("w19", 200, 0.02, 0.20)] {
        let (na, nb) = (a.calls(), b.calls());
        burst(&gw.url, route, n, 8).await;
        let (da, db) = (a.calls() - na, b.calls() - nb);
        assert_eq!(da + db, n, "{route}: one call per request");
        let share = da as f64 / n as f64;
        assert!(
            (lo..=hi).contains(&share),
            "{route}: a's share {share} not in {lo}..{hi}"
        );
    }
    let (na, nb) = (a.calls(), b.calls());
    burst(&gw.url, "ordered", 20, 4).await;
    assert_eq!(
        (a.calls() - na, b.calls() - nb),
        (0, 20),
        "in order: b first"
    );
    // A weighted group still fails over to its other members: a down, b serves every request,
    // once each; a is called on the requests that drew it first (about 3/4 of them), once.
    a.set_always(Some(status(500)));
    let (na, nb) = (a.calls(), b.calls());
    burst(&gw.url, "w31", 80, 8).await;
    a.set_always(None);
    let (da, db) = (a.calls() - na, b.calls() - nb);
    assert_eq!(db, 80, "b serves every request once");
    assert!((40..=76).contains(&da), "a drawn first {da} of 80 times");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Concurrency limits
// ---------------------------------------------------------------------------------------------

async fn until(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "waited too long for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// a with max_concurrency = 1: while one call is in flight (whole or streamed), the next request
/// of the group goes to b; alone in its group, a serves requests one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_upstream_sends_the_next_request_elsewhere() {
    let (a, a_url) = answering("a").await;
    let (b, b_url) = answering("b").await;
    let cfg = [
        up(
            "a",
            &a_url,
            &format!("max_concurrency = 1\ntimeout_ms = 10000\n{CALM}"),
        ),
        up("b", &b_url, CALM),
        fixed("ab", r#"["a", "b"]"#, ""),
        fixed("solo", "\"a\"", ""),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    assert_eq!(health(&gw.url).await["upstreams"]["a"]["in_flight"], 0);
    for stream in [false, true] {
        let what = format!("stream={stream}");
        let (na, nb) = (a.calls(), b.calls());
        if stream {
            a.push(Scripted::SseTimed {
                chunks: vec![
                    (0, role_chunk()),
                    (0, content_chunk("slow ")),
                    (1500, content_chunk("stream")),
                    (0, chunk(json!({}), json!("stop"))),
                    (0, "[DONE]".into()),
                ],
            });
        } else {
            a.delay_ms.store(1500, Ordering::SeqCst);
        }
        let url = gw.url.clone();
        let body = req("ab", "first");
        let first =
            tokio::spawn(
                async move { send(&url, &if stream { streamed(body) } else { body }).await },
            );
        // Once a holds the call (the request is at the mock), a second request arrives.
        until("the first call", || a.calls() == na + 1).await;
        let h = health(&gw.url).await;
        assert_eq!(h["upstreams"]["a"]["in_flight"], 1, "{what}: {h}");
        let (tier, tried, _) = served(&send(&gw.url, &req("ab", "second")).await, false, &what);
        assert_eq!((tier.as_str(), tried), ("b", 1), "{what}: a is full");
        let r = first.await.unwrap();
        a.delay_ms.store(0, Ordering::SeqCst);
        let (tier, _, content) = served(&r, stream, &what);
        assert_eq!(tier, "a", "{what}");
        if stream {
            assert_eq!(content, "slow stream");
        }
        assert_eq!((a.calls() - na, b.calls() - nb), (1, 1), "{what}");
        assert_eq!(health(&gw.url).await["upstreams"]["a"]["in_flight"], 0);
    }
    // Alone in its group, a full upstream is waited for: two requests, one after the other.
    a.delay_ms.store(400, Ordering::SeqCst);
    let n = a.calls();
    let t0 = Instant::now();
    let (one, two) = (req("solo", "one"), req("solo", "two"));
    let (r1, r2) = tokio::join!(send(&gw.url, &one), send(&gw.url, &two));
    let took = t0.elapsed();
    a.delay_ms.store(0, Ordering::SeqCst);
    for r in [r1, r2] {
        let (tier, tried, _) = served(&r, false, "solo");
        assert_eq!((tier.as_str(), tried), ("a", 1));
    }
    assert_eq!(a.calls() - n, 2);
    assert!(
        took >= Duration::from_millis(750),
        "one at a time: two 400 ms calls took {took:?}"
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 9. Budgets
// ---------------------------------------------------------------------------------------------

fn spent(gw: &Running, route: &str) -> (u64, u64) {
    let r = gw
        .gateway
        .routes()
        .iter()
        .find(|r| r.name() == route)
        .unwrap();
    let s = r.budget.spent();
    (s.calls, s.micros)
}

/// One reservation — the most any upstream of the large group could cost — covers a request's
/// attempts; the spend settles at the price of the upstream that served, exactly, and nothing
/// stays reserved; a request that moved between upstreams is still one call of `max_calls`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reservation_covers_every_attempt_and_settles_at_the_servers_price() {
    let (a, a_url) = answering("a").await;
    let (b, b_url) = answering("b").await;
    // Unsure of everything: the cascade escalates.
    let (s, s_url) = mock(reply(|_| ("maybe".into(), -3.0))).await;
    a.set_always(Some(billed("answer from a")));
    b.set_always(Some(billed("answer from b")));
    let cfg = [
        up(
            "a",
            &a_url,
            &format!("price = \"token:10:30\"\ntimeout_ms = 300\n{CALM}"),
        ),
        up("b", &b_url, &format!("price = \"token:20:60\"\n{CALM}")),
        up("s", &s_url, "price = \"token:0:0\"\nlogprobs = true\n"),
        fixed("f", r#"["a", "b"]"#, "[route.budget]\nmax_usd = 100.0\n"),
        fixed("one", r#"["a", "b"]"#, "[route.budget]\nmax_calls = 1\n"),
        fixed("tight", r#"["a", "b"]"#, "[route.budget]\nmax_usd = 0.5\n"),
        fixed("roomy", r#"["a", "b"]"#, "[route.budget]\nmax_usd = 0.7\n"),
        "[[route]]\nname = \"casc\"\nkind = \"cascade\"\nsmall = \"s\"\nlarge = [\"a\", \"b\"]\nthreshold = 1.0\nexplore = 0.0\n[route.budget]\nmax_usd = 100.0\n".to_string(),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    // 1,000 input and 500 output tokens: a at $10/$30 per million, b at $20/$60.
    let (cost_a, cost_b) = (25_000u64, 50_000u64);
    let mut want = (0u64, 0u64);
    let cases: Vec<(&str, Scripted, bool, &str, u64)> = vec![
        ("a 500, b serves", status(500), false, "b", cost_b),
        (
            "a 429, b serves",
            Scripted::error(429, err_body("slow", "requests")),
            false,
            "b",
            cost_b,
        ),
        ("a serves", billed("answer from a"), false, "a", cost_a),
        ("a 503, b streams", status(503), true, "b", cost_b),
        ("a streams", billed("answer from a"), true, "a", cost_a),
    ];
    for (what, fail, stream, tier_want, cost) in cases {
        let (na, nb) = (a.calls(), b.calls());
        a.push(fail);
        let body = req("f", "hello");
        let r = send(&gw.url, &if stream { streamed(body) } else { body }).await;
        let (tier, _, _) = served(&r, stream, what);
        assert_eq!(tier, tier_want, "{what}");
        let calls = if tier_want == "a" { (1, 0) } else { (1, 1) };
        assert_eq!((a.calls() - na, b.calls() - nb), calls, "{what}");
        want = (want.0 + 1, want.1 + cost);
        assert_eq!(
            spent(&gw, "f"),
            want,
            "{what}: settled at {tier_want}'s price"
        );
        if !stream {
            let usd = r.body["tandem"]["cost_usd"].as_f64().unwrap();
            assert!((usd - cost as f64 / 1e6).abs() < 1e-9, "{what}: {usd}");
        }
    }
    // Both fail (two attempts each, a b a b): the reservation is released whole.
    let (na, nb) = (a.calls(), b.calls());
    for _ in 0..2 {
        a.push(status(500));
        b.push(status(503));
    }
    let r = send(&gw.url, &req("f", "hello")).await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert_eq!((a.calls() - na, b.calls() - nb), (2, 2));
    assert_eq!(spent(&gw, "f"), want, "released: nothing kept");

    // max_calls = 1: a request that moved from a to b is one call; the next is refused.
    a.push(status(500));
    let (tier, tried, _) = served(&send(&gw.url, &req("one", "x")).await, false, "one");
    assert_eq!((tier.as_str(), tried), ("b", 2));
    assert_eq!(spent(&gw, "one"), (1, cost_b));
    let (na, nb) = (a.calls(), b.calls());
    let r = send(&gw.url, &req("one", "x")).await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "insufficient_quota");
    assert_eq!(
        (a.calls() - na, b.calls() - nb),
        (0, 0),
        "refused before any call"
    );

    // The reservation is the group's most expensive estimate: with 10,000 output tokens a could
    // cost ~$0.30 and b ~$0.60, so a $0.50 cap refuses although a alone would fit (it never
    // can: 400 `request_over_budget`), and a $0.70 cap admits (and, a serving, keeps a's actual
    // cost only).
    let capped = json!({"model": "tight", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10000});
    let (na, nb) = (a.calls(), b.calls());
    let r = send(&gw.url, &capped).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "request_over_budget");
    assert_eq!((a.calls() - na, b.calls() - nb), (0, 0));
    assert_eq!(spent(&gw, "tight"), (0, 0));
    let mut roomy = capped.clone();
    roomy["model"] = json!("roomy");
    let (tier, _, _) = served(&send(&gw.url, &roomy).await, false, "roomy");
    assert_eq!(tier, "a");
    assert_eq!(spent(&gw, "roomy"), (1, cost_a));

    // A cascade: the small draft escalates, the large group fails over; the route's budget holds
    // the large call at b's price (the small one costs nothing here).
    a.push(status(502));
    let (ns, na, nb) = (s.calls(), a.calls(), b.calls());
    let r = send(&gw.url, &req("casc", "hard one")).await;
    let (tier, tried, content) = served(&r, false, "cascade");
    assert_eq!(
        (tier.as_str(), tried, content.as_str()),
        ("b", 3, "answer from b")
    );
    assert_eq!(r.body["tandem"]["role"], "large");
    assert_eq!((s.calls() - ns, a.calls() - na, b.calls() - nb), (1, 1, 1));
    assert_eq!(spent(&gw, "casc"), (1, cost_b));
    let usd = r.body["tandem"]["cost_usd"].as_f64().unwrap();
    assert!((usd - cost_b as f64 / 1e6).abs() < 1e-9, "{usd}");

    // Last (a's slow handler may outlive the timeout; no script is left for it to take): a
    // times out, b serves at its price.
    let (na, nb) = (a.calls(), b.calls());
    let before = spent(&gw, "f");
    a.delay_ms.store(700, Ordering::SeqCst);
    let r = send(&gw.url, &req("f", "hello")).await;
    a.delay_ms.store(0, Ordering::SeqCst);
    let (tier, tried, _) = served(&r, false, "a timeout");
    assert_eq!((tier.as_str(), tried), ("b", 2));
    assert_eq!((a.calls() - na, b.calls() - nb), (1, 1));
    assert_eq!(spent(&gw, "f"), (before.0 + 1, before.1 + cost_b));
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 10. Config errors
// ---------------------------------------------------------------------------------------------

fn validate(text: &str) -> Result<tandem_server::config::Validated, String> {
    let cfg: ServerConfig = toml::from_str(text).map_err(|e| e.to_string())?;
    cfg.validate(Path::new("t.toml"), std::env::temp_dir())
        .map_err(|e| e.to_string())
}

const A_B: &str = "[[upstream]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\n\
                   [[upstream]]\nname = \"b\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\n";

fn cascade_with(roles: &str) -> String {
    format!(
        "{A_B}[[route]]\nname = \"r\"\nkind = \"cascade\"\ngate = \"learned\"\nthreshold = 1.0\n{roles}\n"
    )
}

/// Bad groups and bad retry, breaker and concurrency settings are refused at load, naming the
/// field and the value; good groups resolve to their members and weights.
#[test]
fn bad_group_and_resilience_settings_name_their_field_and_value() {
    let roles: Vec<(&str, &str)> = vec![
        ("small = \"a\"\nlarge = []", "route[0].large = []"),
        ("small = \"a\"\nlarge = [\"b\", \"b\"]", "route[0].large[1] = b"),
        ("small = \"a\"\nlarge = [\"a\", \"nope\"]", "route[0].large[1] = nope"),
        ("small = \"a\"\nlarge = [\"nope\"]", "route[0].large[0] = nope"),
        ("small = \"a\"\nlarge = \"nope\"", "route[0].large = nope"),
        (
            "small = \"a\"\nlarge = [{ upstream = \"b\", weight = 0 }]",
            "route[0].large[0].weight = 0",
        ),
        (
            "small = \"a\"\nlarge = [{ upstream = \"b\", weight = -2 }]",
            "route[0].large[0].weight = -2",
        ),
        (
            "small = \"a\"\nlarge = [{ upstream = \"b\", weight = 1.5 }]",
            "route[0].large[0].weight = 1.5",
        ),
        (
            "small = \"a\"\nlarge = [{ upstream = \"a\", weight = 1 }, { upstream = \"b\", wieght = 2 }]",
            "route[0].large[1].wieght = 2",
        ),
        (
            "small = \"a\"\nlarge = [{ weight = 2 }]",
            "route[0].large[0].upstream = (missing)",
        ),
        (
            "small = \"a\"\nlarge = [{ upstream = 5 }]",
            "route[0].large[0].upstream = 5",
        ),
        (
            "small = \"a\"\nlarge = [{ upstream = \"nope\", weight = 2 }]",
            "route[0].large[0].upstream = nope",
        ),
        ("small = \"a\"\nlarge = 3", "route[0].large = 3"),
        ("small = \"a\"\nlarge = [3]", "route[0].large[0] = 3"),
        ("small = [\"a\", \"zzz\"]\nlarge = \"b\"", "route[0].small[1] = zzz"),
        ("small = []\nlarge = \"b\"", "route[0].small = []"),
    ];
    for (r, want) in roles {
        let e = validate(&cascade_with(r))
            .err()
            .unwrap_or_else(|| panic!("{r}: accepted"));
        assert!(e.contains(want), "{r}: {e} should contain {want}");
    }
    // A fixed route's upstream is a group too.
    let e = validate(&format!(
        "{A_B}[[route]]\nname = \"f\"\nkind = \"fixed\"\nupstream = [\"a\", \"nope\"]\n"
    ))
    .unwrap_err();
    assert!(e.contains("route[0].upstream[1] = nope"), "{e}");
    // Upstream settings: `a`'s, appended after its keys.
    let ups: Vec<(&str, &str)> = vec![
        (
            "[upstream.retry]\nattempts = 0",
            "upstream[0].retry.attempts = 0",
        ),
        (
            "[upstream.retry]\nattempts = 11",
            "upstream[0].retry.attempts = 11",
        ),
        (
            "[upstream.retry]\nbackoff_ms = 500\nmax_backoff_ms = 100",
            "upstream[0].retry.max_backoff_ms = 100",
        ),
        (
            "[upstream.breaker]\nerror_rate = nan",
            "upstream[0].breaker.error_rate = NaN",
        ),
        (
            "[upstream.breaker]\nerror_rate = 1.5",
            "upstream[0].breaker.error_rate = 1.5",
        ),
        (
            "[upstream.breaker]\nerror_rate = 0.0",
            "upstream[0].breaker.error_rate = 0",
        ),
        (
            "[upstream.breaker]\nconsecutive_failures = 0",
            "upstream[0].breaker.consecutive_failures = 0",
        ),
        (
            "[upstream.breaker]\nopen_ms = 0",
            "upstream[0].breaker.open_ms = 0",
        ),
        (
            "[upstream.breaker]\nwindow_s = 0",
            "upstream[0].breaker.window_s = 0",
        ),
        (
            "[upstream.breaker]\nhalf_open_probes = 0",
            "upstream[0].breaker.half_open_probes = 0",
        ),
        ("max_concurrency = 0", "upstream[0].max_concurrency = 0"),
        ("[upstream.retry]\ntries = 2", "unknown field `tries`"),
        (
            "[upstream.breaker]\nthreshold = 2",
            "unknown field `threshold`",
        ),
    ];
    for (extra, want) in ups {
        let text = A_B.replacen("model = \"m\"\n", &format!("model = \"m\"\n{extra}\n"), 1);
        let e = validate(&format!(
            "{text}[[route]]\nname = \"f\"\nkind = \"fixed\"\nupstream = \"a\"\n"
        ))
        .err()
        .unwrap_or_else(|| panic!("{extra}: accepted"));
        assert!(e.contains(want), "{extra}: {e} should contain {want}");
    }
    // Good groups.
    let v = validate(&cascade_with(
        "small = [\"a\", \"b\"]\nlarge = [{ upstream = \"b\", weight = 3 }, { upstream = \"a\", weight = 1 }]",
    ))
    .unwrap();
    assert_eq!(
        v.routes[0].small,
        Some(Group {
            members: vec![0, 1],
            weights: None
        })
    );
    assert_eq!(
        v.routes[0].large,
        Some(Group {
            members: vec![1, 0],
            weights: Some(vec![3, 1])
        })
    );
    let v = validate(&cascade_with(
        "small = \"a\"\nlarge = [{ upstream = \"b\" }]",
    ))
    .unwrap();
    assert_eq!(v.routes[0].large, Some(Group::one(1)));
}

// ---------------------------------------------------------------------------------------------
// 11. Roles hand over when a group cannot serve; abandoned streams
// ---------------------------------------------------------------------------------------------

/// A cascade's small group that cannot serve hands the request to the large group: when its
/// upstream fails (500), and just the same when its breaker is open and it is not even called —
/// plain, streamed, and with `tandem.force = "small"` (which takes the small model's own path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_group_with_every_breaker_open_hands_the_request_to_the_large_one() {
    // Sure of its answers: served small whenever it can answer.
    let (s, s_url) = mock(reply(|_| ("sure".into(), -0.01))).await;
    let (l, l_url) = answering("l").await;
    let cfg = [
        up(
            "s",
            &s_url,
            "logprobs = true\n[upstream.retry]\nattempts = 1\n[upstream.breaker]\nconsecutive_failures = 2\nopen_ms = 60000\n",
        ),
        up("l", &l_url, CALM),
        "[[route]]\nname = \"c\"\nkind = \"cascade\"\nsmall = \"s\"\nlarge = \"l\"\nthreshold = 1.0\nexplore = 0.0\n".to_string(),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    let (tier, _, content) = served(&send(&gw.url, &req("c", "x")).await, false, "healthy");
    assert_eq!((tier.as_str(), content.as_str()), ("s", "sure"));
    s.set_always(Some(status(500)));
    for i in 1..=2 {
        let r = send(&gw.url, &req("c", "x")).await;
        let (tier, tried, _) = served(&r, false, "small failing");
        assert_eq!((tier.as_str(), tried), ("l", 2), "{i}");
        assert_eq!(r.body["tandem"]["role"], "large");
        assert_eq!(s.calls(), 1 + i);
    }
    let h = health(&gw.url).await;
    assert_eq!(h["upstreams"]["s"]["breaker"], "open", "{h}");
    let mut forced = req("c", "x");
    forced["tandem"] = json!({"force": "small"});
    let cases = [
        ("cascade", req("c", "x"), false),
        ("cascade streamed", streamed(req("c", "x")), true),
        ("forced small", forced.clone(), false),
        ("forced small streamed", streamed(forced), true),
    ];
    for (what, body, stream) in cases {
        let nl = l.calls();
        let r = send(&gw.url, &body).await;
        let (tier, tried, content) = served(&r, stream, what);
        assert_eq!(
            (tier.as_str(), tried, content.as_str()),
            ("l", 1, "answer from l"),
            "{what}: the large model serves"
        );
        assert_eq!(r.h("x-tandem-role").as_deref(), Some("large"), "{what}");
        assert_eq!(
            s.calls(),
            3,
            "{what}: the open small upstream is not called"
        );
        assert_eq!(l.calls() - nl, 1, "{what}");
    }
    gw.stop().await;
}

/// A stream that dies after its first content is charged its upper bound, as before groups —
/// the bound of the upstream that streamed it (its price), not the group's most expensive one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_stream_is_charged_at_its_own_upstreams_bound() {
    let (a, a_url) = answering("a").await;
    let (b, b_url) = answering("b").await;
    let cfg = [
        up("a", &a_url, &format!("price = \"token:10:30\"\n{CALM}")),
        up("b", &b_url, &format!("price = \"token:20:60\"\n{CALM}")),
        fixed("f", r#"["a", "b"]"#, "[route.budget]\nmax_usd = 100.0\n"),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    a.push(Scripted::Sse {
        chunks: vec![role_chunk(), content_chunk("Hel")],
        delay_ms: 0,
    });
    // 1,000 output tokens at most: a's bound is 30,000 micro-dollars of output plus its input
    // bound (a few hundred tokens at $10/M); b's is 60,000 plus twice that.
    let mut body = streamed(req("f", "hello"));
    body["max_tokens"] = json!(1000);
    let r = send(&gw.url, &body).await;
    let (events, _) = r.sse();
    assert_eq!(content_of(&events), "Hel", "{}", r.text);
    assert_eq!(error_events(&events).len(), 1, "{}", r.text);
    assert_eq!((a.calls(), b.calls()), (1, 0));
    let (calls, micros) = spent(&gw, "f");
    assert_eq!(calls, 1);
    assert!(
        (30_000..40_000).contains(&micros),
        "charged {micros} micro-dollars: a's bound is 30,000 + its input, b's over 60,000"
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Deadline across attempts
// ---------------------------------------------------------------------------------------------

/// Three hanging upstreams with 2 attempts each would take 6 × `timeout_ms`; the route's
/// `deadline_ms` stops the walk at its deadline with 504 `deadline_exceeded` (plain and
/// streamed), while a route without one walks every attempt. A deadline that is not reached
/// changes nothing, and a cascade whose large model runs out of time serves its usable draft.
#[tokio::test]
async fn a_route_deadline_bounds_every_attempt_together() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_url) = answering("a").await;
    let (b, b_url) = answering("b").await;
    let (c, c_url) = answering("c").await;
    let (s, s_url) = answering("s").await;
    let hang = "timeout_ms = 400\nfirst_token_timeout_ms = 400\n[upstream.retry]\nattempts = 2\nbackoff_ms = 1\nmax_backoff_ms = 1\n";
    let cfg = format!(
        "{}{}{}{}{}{}{}",
        up("a", &a_url, &format!("{hang}{CALM}")),
        up("b", &b_url, &format!("{hang}{CALM}")),
        up("c", &c_url, &format!("{hang}{CALM}")),
        up("s", &s_url, "logprobs = true\n"),
        fixed("bounded", "[\"a\", \"b\", \"c\"]", "deadline_ms = 700"),
        fixed("unbounded", "[\"a\", \"b\", \"c\"]", ""),
        "[[route]]\nname = \"casc\"\nkind = \"cascade\"\nsmall = \"s\"\nlarge = [\"a\", \"b\"]\nthreshold = -1000.0\ndeadline_ms = 900\n",
    );
    let gw = start(&cfg, dir.path()).await;
    for m in [&a, &b, &c] {
        m.delay_ms.store(3_000, Ordering::SeqCst);
    }
    for stream in [false, true] {
        let calls = a.calls() + b.calls() + c.calls();
        let t0 = Instant::now();
        let body = req("bounded", "hello");
        let r = send(&gw.url, &if stream { streamed(body) } else { body }).await;
        let took = t0.elapsed();
        assert_eq!(r.status, 504, "stream={stream}: {}", r.text);
        assert_eq!(r.body["error"]["code"], "deadline_exceeded", "{}", r.text);
        assert!(r.text.contains("bounded"), "names the route: {}", r.text);
        assert!(
            took < Duration::from_millis(2_000),
            "stopped at the deadline: {took:?}"
        );
        // 400 ms each: the first times out, the second is cut by the deadline.
        assert!(
            a.calls() + b.calls() + c.calls() - calls <= 3,
            "stream={stream}"
        );
    }
    // Without a deadline every member's attempts are walked: at least 3 × 400 ms.
    let t0 = Instant::now();
    let r = send(&gw.url, &req("unbounded", "hello")).await;
    assert_eq!(r.status, 504, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "upstream_timeout", "{}", r.text);
    assert!(t0.elapsed() >= Duration::from_millis(1_200));
    // The cascade's small draft is made at once; its large model runs out of time: the draft serves.
    let large_calls = a.calls() + b.calls();
    let t0 = Instant::now();
    let r = send(&gw.url, &req("casc", "hello")).await;
    let (tier, _, content) = served(&r, false, "cascade past its deadline");
    assert_eq!((tier.as_str(), content.as_str()), ("s", "answer from s"));
    assert!(a.calls() + b.calls() > large_calls, "it did escalate");
    assert!(
        t0.elapsed() < Duration::from_millis(2_500),
        "{:?}",
        t0.elapsed()
    );
    for m in [&a, &b, &c] {
        m.delay_ms.store(0, Ordering::SeqCst);
    }
    // Answers within the deadline are untouched.
    let (tier, tried, _) = served(&send(&gw.url, &req("bounded", "x")).await, false, "in time");
    assert_eq!((tier.as_str(), tried), ("a", 1));
    drop(s);
    gw.stop().await;
}

/// A call that reached the upstream and then hung (cut by its timeout or the route's deadline)
/// or broke stays counted against `max_calls`: hanging upstreams cannot take more calls than
/// the cap, plain or streamed. An answered error (500) gives its call back.
#[tokio::test]
async fn calls_that_hang_stay_counted_against_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_url) = answering("a").await;
    let once = "timeout_ms = 300\nfirst_token_timeout_ms = 300\n[upstream.retry]\nattempts = 1\n";
    let cfg = format!(
        "{}{}{}",
        up("a", &a_url, &format!("{once}{CALM}")),
        fixed(
            "cap3",
            "\"a\"",
            "on_exhausted = \"refuse\"\n[route.budget]\nmax_calls = 3\n"
        ),
        fixed(
            "cap3d",
            "\"a\"",
            "deadline_ms = 200\non_exhausted = \"refuse\"\n[route.budget]\nmax_calls = 3\n"
        ),
    );
    let gw = start(&cfg, dir.path()).await;
    for route in ["cap3", "cap3d"] {
        a.delay_ms.store(2_000, Ordering::SeqCst);
        let n = a.calls();
        let mut statuses = Vec::new();
        for i in 0..6 {
            let body = req(route, "hello");
            let r = send(&gw.url, &if i % 2 == 1 { streamed(body) } else { body }).await;
            statuses.push(r.status);
        }
        assert_eq!(a.calls() - n, 3, "{route}: {statuses:?}");
        assert_eq!(
            statuses.iter().filter(|&&s| s == 429).count(),
            3,
            "{route}: {statuses:?}"
        );
        a.delay_ms.store(0, Ordering::SeqCst);
    }
    // A 500 is an answer: nothing was generated, so the call goes back.
    let gw2_dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}",
        up("a", &a_url, &format!("{once}{CALM}")),
        fixed(
            "cap1",
            "\"a\"",
            "on_exhausted = \"refuse\"\n[route.budget]\nmax_calls = 1\n"
        ),
    );
    let gw2 = start(&cfg, gw2_dir.path()).await;
    a.push(status(500));
    assert_eq!(send(&gw2.url, &req("cap1", "x")).await.status, 502);
    assert_eq!(send(&gw2.url, &req("cap1", "x")).await.status, 200);
    assert_eq!(send(&gw2.url, &req("cap1", "x")).await.status, 429);
    gw2.stop().await;
    gw.stop().await;
}
