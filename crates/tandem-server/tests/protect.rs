//! The gateway protects itself: clients that trickle their headers or bodies are cut off, a cap
//! on connections keeps it within its open files, load past `max_in_flight` is shed with 503 and
//! `Retry-After`, and shutdown has a deadline that a stalled client cannot hold up.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn setup_env() {
    std::env::set_var("TANDEM_TEST_LARGE_KEY", "sk-test");
}

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection (or `within` passes); returns what it sent and
/// whether it closed.
async fn read_to_close(s: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into(), false),
        }
    }
}

/// Sends one chat request on its own connection; the status, `Retry-After`, `Connection` and body.
async fn chat_once(url: &str, route: &str) -> (u16, Option<String>, Option<String>, Value) {
    let r = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat_body(route, "hi"))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    let h = |k: &str| r.headers().get(k).map(|v| v.to_str().unwrap().to_string());
    let (status, retry, conn) = (r.status().as_u16(), h("retry-after"), h("connection"));
    (status, retry, conn, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_clients_are_cut_off_and_others_still_served() {
    setup_env();
    let (_s, s_url) = mock(reply(|_| ("ok".into(), -0.1))).await;
    let (_l, l_url) = mock(reply(|_| ("ok".into(), -0.1))).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[server]\nheader_read_timeout_ms = 300\nbody_read_timeout_ms = 300\nmax_connections = 32\n{}[[route]]\nname = \"f\"\nkind = \"fixed\"\nupstream = \"large\"\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let a = addr(&gw.url);
    // 100 clients that send half a request's headers and stop: more than the cap of 32.
    let mut trickling = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(&a).await.unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        trickling.push(s);
    }
    // Every trickling connection is closed by the server: the first 32 at the header timeout,
    // the others, past the cap, at once or at the same timeout (they were being refused).
    let mut closed = 0;
    for s in &mut trickling {
        if read_to_close(s, Duration::from_secs(10)).await.1 {
            closed += 1;
        }
    }
    assert_eq!(closed, 100, "trickling connections the server closed");
    // Their slots are free again: a normal client is served.
    let (status, _, _, body) = chat_once(&gw.url, "f").await;
    assert_eq!(status, 200, "{body}");

    // A body that trickles: 408 in OpenAI's shape, for a few sizes of what did arrive.
    for sent in [0usize, 10, 99] {
        let mut s = TcpStream::connect(&a).await.unwrap();
        let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n";
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&vec![b' '; sent]).await.unwrap();
        let (resp, _) = read_to_close(&mut s, Duration::from_secs(10)).await;
        assert!(
            resp.starts_with("HTTP/1.1 408"),
            "{sent} bytes sent: {resp}"
        );
        assert!(resp.contains("request_timeout"), "{resp}");
    }
    // One that keeps sending a byte now and then, never stalling for the timeout, still ends
    // at it: the deadline is for the whole body.
    let mut s = TcpStream::connect(&a).await.unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    for _ in 0..60 {
        if s.write_all(b" ").await.is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await
        {
            resp.extend_from_slice(&buf[..n]);
            break;
        }
    }
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_get_503_at_once_not_a_wait() {
    setup_env();
    let (_s, s_url) = mock(reply(|_| ("ok".into(), -0.1))).await;
    let (_l, l_url) = mock(reply(|_| ("ok".into(), -0.1))).await;
    let dir = tempfile::tempdir().unwrap();
    // Long header timeout: only the cap decides here.
    let cfg = format!(
        "[server]\nmax_connections = 4\nheader_read_timeout_ms = 60000\n{}[[route]]\nname = \"f\"\nkind = \"fixed\"\nupstream = \"large\"\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let a = addr(&gw.url);
    // Four connections held open (kept alive after a request each, as a client's pool holds them).
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(&a).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    // A fifth: answered 503 `overloaded` with Retry-After, and its connection closed.
    let (status, retry, conn, body) = chat_once(&gw.url, "f").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(conn.as_deref(), Some("close"));
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    // Once the held connections close, new ones are served again.
    drop(held);
    let mut served = false;
    for _ in 0..50 {
        if chat_once(&gw.url, "f").await.0 == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "a new connection served once the held ones closed");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_past_max_in_flight_is_shed_with_retry_after() {
    setup_env();
    let (_s, s_url) = mock(reply(|_| ("ok".into(), -0.1))).await;
    let (large, l_url) = mock(reply(|_| ("ok".into(), -0.1))).await;
    large.delay_ms.store(250, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[server]\nmax_in_flight = 3\n{}[[route]]\nname = \"f\"\nkind = \"fixed\"\nupstream = \"large\"\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let url = gw.url.clone();
        tasks.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!("{url}/v1/chat/completions"))
                .json(&chat_body("f", &format!("q{i}")))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = r.json().await.unwrap();
            (status, retry, body)
        }));
    }
    let (mut ok, mut shed) = (0, 0);
    for t in tasks {
        let (status, retry, body) = t.await.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                shed += 1;
                assert_eq!(retry.as_deref(), Some("1"));
                assert_eq!(body["error"]["code"], "overloaded", "{body}");
            }
            other => panic!("status {other}: {body}"),
        }
    }
    assert!(ok >= 3 && shed >= 1, "served {ok}, shed {shed}");
    assert_eq!(ok + shed, 12, "every request answered");
    assert_eq!(large.calls(), ok, "shed requests never reach the upstream");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_counts_in_flight_until_its_body_ends() {
    setup_env();
    let (_s, s_url) = mock(reply(|_| ("ok".into(), -0.1))).await;
    let (large, l_url) = mock(reply(|_| ("one two three four five six".into(), -0.1))).await;
    // Well within the test upstream's 150 ms idle timeout, but the stream lasts about 0.5 s.
    large.chunk_delay_ms.store(100, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[server]\nmax_in_flight = 1\n{}[[route]]\nname = \"f\"\nkind = \"fixed\"\nupstream = \"large\"\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let mut body = chat_body("f", "hi");
    body["stream"] = serde_json::json!(true);
    let mut stream = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // Its head is out, its body is not: a second request is over the cap.
    let (status, retry, _, shed) = chat_once(&gw.url, "f").await;
    assert_eq!(status, 503, "{shed}");
    assert_eq!(retry.as_deref(), Some("1"));
    let mut text = String::new();
    while let Some(c) = stream.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(text.contains("[DONE]"), "{text}");
    // The stream is over: its slot is free.
    let (status, _, _, body) = chat_once(&gw.url, "f").await;
    assert_eq!(status, 200, "{body}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_cannot_hold_up_shutdown() {
    setup_env();
    let (_s, s_url) = mock(reply(|_| ("ok".into(), -0.1))).await;
    let (large, l_url) = mock(reply(|_| ("ok".into(), -0.1))).await;
    let dir = tempfile::tempdir().unwrap();
    // Long read timeouts: only the shutdown's grace period can end the stalled connections.
    let cfg = format!(
        "[server]\nstate_dir = \"state\"\nshutdown_grace_s = 1\nheader_read_timeout_ms = 60000\nbody_read_timeout_ms = 60000\n{}[[route]]\nname = \"f\"\nkind = \"fixed\"\nupstream = \"large\"\n[route.budget]\nmax_calls = 10\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let a = addr(&gw.url);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&chat_body("f", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // One client mid-request line, one mid-headers, one mid-body, one idle after a request.
    let mut stalled = Vec::new();
    for partial in [
        &b"POST /v1/chat/com"[..],
        b"POST /v1/chat/completions HTTP/1.1\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-length: 50\r\n\r\n{",
    ] {
        let mut s = TcpStream::connect(&a).await.unwrap();
        s.write_all(partial).await.unwrap();
        stalled.push(s);
    }
    let mut idle = TcpStream::connect(&a).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // And a request in flight when the signal comes: it gets its grace and is served whole.
    large.delay_ms.store(150, Ordering::SeqCst);
    let url = gw.url.clone();
    let in_flight = tokio::spawn(async move { chat_once(&url, "f").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    gw.stop().await;
    // Generous: without the deadline it would wait for the 60 s read timeouts.
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "shutdown took {:?}",
        t0.elapsed()
    );
    let (status, _, _, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "{body}");
    // Every connection was closed by the server.
    for s in stalled.iter_mut().chain(std::iter::once(&mut idle)) {
        assert!(read_to_close(s, Duration::from_secs(5)).await.1);
    }
    // The spend of both calls was saved.
    // (State file v2: magic, version, header length, weights length, checksum, header.)
    let state = std::fs::read(dir.path().join("state/f.state")).unwrap();
    let len = u32::from_le_bytes(state[12..16].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&state[32..32 + len]).unwrap();
    assert_eq!(header["budget"]["calls"], 2, "{header}");
    assert!(dir.path().join("state/f.journal").exists());
}
