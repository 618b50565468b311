//! Gateway replicas sharing one Redis (`[server.shared]`), each a whole gateway serving HTTP,
//! against mock upstreams whose calls are counted and against a redis-server of the test's own:
//! together they never pass a budget cap (64 clients on three replicas, streams hung up
//! mid-way), a cascade serves its small model once the other replicas spent the cap, Redis going
//! down fails closed or open as configured and is caught up with when it returns, feedback is
//! taken once by any replica, and what one replica learns reaches the others and a fresh one.
//!
//! Skips with a message when `redis-server` is not installed (`scripts/setup-redis` installs it),
//! unless `CI` is set or TANDEM_REQUIRE_ASSETS=1, where its absence fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "common/redis.rs"]
mod redis_server;

use common::*;
use redis_server::Redis;
use serde_json::{json, Value};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_server::shared::{SharedConfig, SharedSpent, SharedStore};
use tokio::task::JoinSet;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Persistence on, as a production Redis keeps spend across a restart (tests that kill it).
const DURABLE: &[&str] = &[
    "--save",
    "",
    "--appendonly",
    "yes",
    "--appendfsync",
    "always",
];

/// `[server]` with `[server.shared]` on `redis` under `prefix` (`extra`: more shared settings).
fn server(redis: &Redis, prefix: &str, extra: &str) -> String {
    format!(
        "[server]\nfeedback_window = 10000\n[server.shared]\nredis_url = \"{}\"\nprefix = \"{prefix}\"\n{extra}\n",
        redis.url()
    )
}

/// An openai upstream `name` at `url` with `price`, answering within generous timeouts, its
/// breaker kept closed, and asked for usage on streams.
fn upstream(name: &str, url: &str, price: &str) -> String {
    format!(
        "[[upstream]]\nname = \"{name}\"\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"{name}-model\"\n\
         price = \"{price}\"\nlogprobs = true\nstream_usage = true\ntimeout_ms = 10000\n\
         [upstream.breaker]\nconsecutive_failures = 1000\nmin_calls = 1000\n"
    )
}

/// A store of the test's own on the replicas' Redis, to read what it counts.
fn reader(redis: &Redis, prefix: &str) -> SharedStore {
    SharedStore::new(SharedConfig::new(redis.url(), prefix)).unwrap()
}

/// What Redis counts for `route` (no window), once every reservation is closed (settles and
/// releases are sent off the request path) and Redis answers.
async fn settled(store: &SharedStore, route: &str) -> SharedSpent {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = store.spent(route, 0).await {
            if s.open == 0 {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "reservations of `{route}` still open (or Redis unreachable)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `f` every 50 ms until it holds; fails after `secs` seconds, saying `what`.
async fn until<F: Future<Output = bool>>(what: &str, secs: u64, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A reply read whole.
struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Resp {
    fn h(&self, k: &str) -> String {
        self.headers
            .get(k)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }

    /// The error code of an error body.
    fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The `data:` events of a stream, `[DONE]` included.
    fn events(&self) -> Vec<String> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    /// The response id, of a whole answer or a stream.
    fn id(&self) -> String {
        let v = if self.text.starts_with("data: ") {
            serde_json::from_str::<Value>(&self.events()[0]).unwrap()
        } else {
            self.json()
        };
        v["id"].as_str().unwrap().to_string()
    }
}

async fn send(client: &reqwest::Client, url: &str, path: &str, body: &Value) -> Resp {
    let r = client
        .post(format!("{url}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    Resp {
        status,
        headers,
        text,
    }
}

async fn chat(url: &str, body: &Value) -> Resp {
    send(&reqwest::Client::new(), url, "/v1/chat/completions", body).await
}

async fn feedback(url: &str, body: Value) -> Resp {
    send(&reqwest::Client::new(), url, "/v1/feedback", &body).await
}

fn streamed(mut b: Value) -> Value {
    b["stream"] = json!(true);
    b
}

fn no_learn(mut b: Value) -> Value {
    b["tandem"] = json!({"no_learn": true});
    b
}

async fn health(url: &str) -> Value {
    reqwest::get(format!("{url}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A stream ended cleanly: `[DONE]` last, no error event.
fn assert_clean_stream(r: &Resp) {
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{}", r.text);
    assert!(!r.text.contains("\"error\""), "{}", r.text);
}

fn learned(gw: &Running, route: usize) -> u64 {
    gw.gateway.routes()[route]
        .counters
        .learned
        .load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------------------------
// 1. Three replicas, 64 clients: the upstream never bills past the cap
// ---------------------------------------------------------------------------------------------

/// What the large mock bills each call, whatever it reports: 60 input and 8 output tokens at
/// $100 per million tokens each.
const BILLED_PER_CALL: u64 = 68 * 100;
const CAP_USD: f64 = 1.0;
const CAP: u64 = 1_000_000;

/// The large upstream of the overshoot test. Prompts say how it answers: `[nousage]` without
/// usage (the gateway keeps its estimate), `[hangup]` (streams) slowly after the first piece, so
/// the client has hung up before the rest.
fn billing_reply() -> Scripted {
    Scripted::with(|req| {
        let prompt = req["messages"][0]["content"].as_str().unwrap_or("");
        let usage = (!prompt.contains("[nousage]"))
            .then(|| json!({"prompt_tokens": 60, "completion_tokens": 8, "total_tokens": 68}));
        let message = json!({"role": "assistant", "content": "a b c d e f g h"});
        if req["stream"] == true && prompt.contains("[hangup]") {
            let chunks = answer_chunks(
                req,
                &message,
                &json!("stop"),
                &Value::Null,
                usage.as_ref(),
                &json!({}),
            );
            return Scripted::SseTimed {
                chunks: chunks
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| (if i < 2 { 0 } else { 300 }, c))
                    .collect(),
            };
        }
        Scripted::Answer {
            message,
            finish_reason: json!("stop"),
            logprobs: Value::Null,
            usage,
            extra: json!({}),
        }
    })
}

#[derive(Default)]
struct Tally {
    plain: AtomicU64,
    streams: AtomicU64,
    hung_up: AtomicU64,
    refused: AtomicU64,
    /// What the finished requests were told they cost (µ$), plain or in a stream's usage chunk.
    told_micros: AtomicU64,
}

fn micros(usd: &Value) -> u64 {
    (usd.as_f64().unwrap() * 1e6).round() as u64
}

/// One client request of the storm; counts its outcome.
async fn storm_request(client: &reqwest::Client, url: &str, c: usize, k: usize, t: &Tally) {
    let kind = (c + k) % 8;
    let tag = match kind {
        3 | 6 => " [nousage]",
        7 => " [hangup]",
        _ => "",
    };
    let mut body = chat_body("big", &format!("client {c} asks question {k}{tag}"));
    let stream = kind >= 4;
    if stream {
        body = streamed(body);
        body["stream_options"] = json!({"include_usage": true});
    }
    let mut r = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    if status == 429 {
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "insufficient_quota", "{v}");
        t.refused.fetch_add(1, Ordering::SeqCst);
        return;
    }
    assert_eq!(status, 200, "{}", r.text().await.unwrap_or_default());
    if kind == 7 {
        // The first piece, then the client goes away mid-stream.
        let first = r.chunk().await.unwrap().expect("a first chunk");
        assert!(first.starts_with(b"data: "), "{first:?}");
        drop(r);
        t.hung_up.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let text = r.text().await.unwrap();
    if stream {
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert!(!text.contains("\"error\""), "{text}");
        let usage: Value = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .find(|v| v["usage"].is_object())
            .unwrap_or_else(|| panic!("no usage chunk: {text}"));
        assert_eq!(usage["tandem"]["usage_estimated"], kind == 6, "{usage}");
        t.told_micros
            .fetch_add(micros(&usage["tandem"]["cost_usd"]), Ordering::SeqCst);
        t.streams.fetch_add(1, Ordering::SeqCst);
    } else {
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["tandem"]["role"], "large", "{v}");
        assert_eq!(
            v["tandem"]["usage_estimated"],
            kind == 3,
            "usage is estimated exactly when the upstream gave none: {v}"
        );
        t.told_micros
            .fetch_add(micros(&v["tandem"]["cost_usd"]), Ordering::SeqCst);
        t.plain.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_never_let_the_upstream_bill_past_the_cap() {
    let Some(redis) = Redis::start() else { return };
    let (large, l_url) = mock(reply(|_| ("unused".into(), -0.1))).await;
    large.set_always(Some(billing_reply()));
    let cfg = format!(
        "{}{}[[route]]\nname = \"big\"\nkind = \"fixed\"\nupstream = \"large\"\nmax_tokens = 8\n\
         [route.budget]\nmax_usd = {CAP_USD}\n",
        server(&redis, "overshoot", ""),
        upstream("large", &l_url, "token:100:100"),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(start(&cfg, dir.path()).await);
    }
    let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
    let store = reader(&redis, "overshoot");

    // The storm: 64 clients, spread over the replicas, 5 requests each, every kind mixed.
    const CLIENTS: usize = 64;
    const EACH: usize = 5;
    let tally = Arc::new(Tally::default());
    let mut tasks = JoinSet::new();
    for c in 0..CLIENTS {
        let (url, tally) = (urls[c % 3].clone(), tally.clone());
        tasks.spawn(async move {
            let client = reqwest::Client::new();
            for k in 0..EACH {
                storm_request(&client, &url, c, k, &tally).await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let mut requests = (CLIENTS * EACH) as u64;
    let storm_refused = tally.refused.load(Ordering::SeqCst);
    assert!(storm_refused > 0, "the storm reached the cap");
    let after_storm = settled(&store, "big").await;

    // Then one request at a time until every replica refuses: nothing else in flight, so a
    // refusal means the cap is really reached (counted + one estimate > cap).
    let client = reqwest::Client::new();
    let mut refusals_in_a_row = 0;
    let mut i = 0;
    while refusals_in_a_row < 3 {
        assert!(i < 500, "the tail never reached the cap");
        let before = tally.refused.load(Ordering::SeqCst);
        storm_request(&client, &urls[i % 3], 1_000 + i, 0, &tally).await;
        requests += 1;
        if tally.refused.load(Ordering::SeqCst) > before {
            refusals_in_a_row += 1;
        } else {
            refusals_in_a_row = 0;
            // Its settlement lands before the next request is asked.
            settled(&store, "big").await;
        }
        i += 1;
    }
    let counted = settled(&store, "big").await;

    let plain = tally.plain.load(Ordering::SeqCst);
    let streams = tally.streams.load(Ordering::SeqCst);
    let hung_up = tally.hung_up.load(Ordering::SeqCst);
    let refused = tally.refused.load(Ordering::SeqCst);
    let served = plain + streams + hung_up;
    let calls = large.calls() as u64;
    let billed = calls * BILLED_PER_CALL;
    let overshoot = billed.saturating_sub(CAP);
    let told = tally.told_micros.load(Ordering::SeqCst);
    // What Redis counts beyond what the finished requests were told: the hung-up streams.
    let hung_up_counted = counted.micros.saturating_sub(told);
    println!(
        "replicas: overshoot {overshoot} µ$, billed {billed} µ$ ({calls} calls), counted {} µ$ \
         ({} calls), cap {CAP} µ$; served {served} (plain {plain}, streams {streams}, hung up \
         {hung_up}, counted {hung_up_counted} µ$), refused {refused} of {requests} requests (storm: {} µ$ \
         counted, {storm_refused} refused)",
        counted.micros, counted.calls, after_storm.micros
    );
    assert_eq!(
        overshoot, 0,
        "the upstream billed {billed} µ$ past a cap of {CAP}"
    );
    assert_eq!(
        served + refused,
        requests,
        "every request served or refused"
    );
    assert_eq!(
        calls, served,
        "one upstream call per served request, none for a refused one"
    );
    assert!(hung_up > 0 && streams > 0 && plain > 0);
    assert_eq!(counted.calls, calls, "Redis counts every call made");
    assert_eq!(counted.lapsed, 0);
    assert!(
        counted.micros >= billed,
        "Redis counts {} µ$, less than the {billed} µ$ billed",
        counted.micros
    );
    assert!(counted.micros <= CAP, "Redis counts {} µ$", counted.micros);
    // Call by call: each finished request counted what it was told, each hung-up stream at
    // least what the upstream bills for the whole answer.
    assert!(
        told <= counted.micros,
        "told {told} µ$, counted {}",
        counted.micros
    );
    assert!(
        hung_up_counted >= hung_up * BILLED_PER_CALL,
        "{hung_up} hung-up streams counted {hung_up_counted} µ$, billed up to {} µ$",
        hung_up * BILLED_PER_CALL
    );
    // Close to the cap: the last refusals came with nothing in flight, so one more estimate
    // (about 15,000 µ$ here: the body's bytes as tokens and 8 output tokens) would pass it.
    assert!(
        CAP - counted.micros < 20_000,
        "only {} µ$ of {CAP} counted when every replica refused",
        counted.micros
    );
    // Each replica's own count is its part of Redis' count, and each took part.
    let (mut local_calls, mut local_micros) = (0, 0);
    for r in &replicas {
        let s = r.gateway.routes()[0].budget.spent();
        assert!(s.calls > 0, "every replica served some");
        local_calls += s.calls;
        local_micros += s.micros;
    }
    assert_eq!(
        (local_calls, local_micros),
        (counted.calls, counted.micros),
        "the replicas' own counts add up to Redis'"
    );
    for r in replicas {
        r.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// 2. A cascade falls back to its small model when the other replicas spent the cap
// ---------------------------------------------------------------------------------------------

const CASCADE: &str = "[[route]]\nname = \"casc\"\nkind = \"cascade\"\nsmall = \"small\"\n\
    large = \"large\"\nthreshold = 1.0\nexplore = 0.0\n[route.budget]\nmax_calls = 3\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_serves_small_once_the_other_replicas_spent_the_cap() {
    let Some(redis) = Redis::start() else { return };
    let (small, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(large_reply()).await;
    let cfg = format!(
        "{}{}{}{CASCADE}",
        server(&redis, "cascade", ""),
        upstream("small", &s_url, "token:1:1"),
        upstream("large", &l_url, "token:10:30"),
    );
    let dir = tempfile::tempdir().unwrap();
    let a = start(&cfg, dir.path()).await;
    let b = start(&cfg, dir.path()).await;
    // Replica A escalates three unsure drafts: the shared cap of 3 large calls is spent.
    for i in 0..3 {
        let r = chat(&a.url, &chat_body("casc", &format!("hard question {i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.h("x-tandem-role"), "large");
    }
    assert_eq!(large.calls(), 3);
    let store = reader(&redis, "cascade");
    assert_eq!(settled(&store, "casc").await.calls, 3);
    // Replica B has spent nothing itself, yet serves its small drafts, capped, plain or streamed.
    for i in 0..6 {
        let mut body = chat_body("casc", &format!("hard problem {i}"));
        if i % 2 == 1 {
            body = streamed(body);
        }
        let r = chat(&b.url, &body).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.h("x-tandem-role"), "small", "{}", r.text);
        assert_eq!(r.h("x-tandem-capped"), "true", "{}", r.text);
        if i % 2 == 1 {
            assert_clean_stream(&r);
            assert!(r.text.contains("maybe"), "{}", r.text);
        } else {
            assert_eq!(r.json()["choices"][0]["message"]["content"], "maybe 7");
        }
    }
    // Sure drafts are served as ever, not capped.
    let r = chat(&b.url, &chat_body("casc", "easy sum")).await;
    assert_eq!(
        (
            r.h("x-tandem-role").as_str(),
            r.h("x-tandem-capped").as_str()
        ),
        ("small", "false")
    );
    assert_eq!(large.calls(), 3, "replica B never called the large model");
    assert_eq!(small.calls(), 3 + 7);
    let route = &b.gateway.routes()[0];
    assert_eq!(route.budget.spent().calls, 0, "B's own count allowed it");
    assert_eq!(route.counters.capped.load(Ordering::SeqCst), 6);
    let s = settled(&store, "casc").await;
    assert_eq!((s.calls, s.lapsed), (3, 0), "refusals count nothing");
    a.stop().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. fail_closed: no large call while Redis is down
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_and_large_calls_resume_when_it_returns() {
    let Some(mut redis) = Redis::start_with(DURABLE) else {
        return;
    };
    let (small, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(large_reply()).await;
    let cfg = format!(
        "{}{}{}[[route]]\nname = \"big\"\nkind = \"fixed\"\nupstream = \"large\"\n\
         [route.budget]\nmax_usd = 100.0\n\
         [[route]]\nname = \"casc\"\nkind = \"cascade\"\nsmall = \"small\"\nlarge = \"large\"\n\
         threshold = 1.0\nexplore = 0.0\n[route.budget]\nmax_usd = 100.0\n",
        server(
            &redis,
            "closed",
            "on_redis_down = { mode = \"fail_closed\" }\nop_timeout_ms = 2000"
        ),
        upstream("small", &s_url, "token:1:1"),
        upstream("large", &l_url, "token:10:30"),
    );
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    let r = chat(&gw.url, &chat_body("big", "hello")).await;
    assert_eq!((r.status, r.h("x-tandem-role").as_str()), (200, "large"));
    let r = chat(&gw.url, &chat_body("casc", "hard one")).await;
    assert_eq!((r.status, r.h("x-tandem-role").as_str()), (200, "large"));
    assert_eq!(large.calls(), 2);
    let h = health(&gw.url).await;
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["shared"]["reachable"], true, "{h}");
    let store = reader(&redis, "closed");
    settled(&store, "big").await;

    redis.kill();
    for i in 0..4 {
        // The fixed route has nothing to fall back on: 503, retry in a moment.
        let mut body = chat_body("big", &format!("hello {i}"));
        if i % 2 == 1 {
            body = streamed(body);
        }
        let r = chat(&gw.url, &body).await;
        assert_eq!(r.status, 503, "{}", r.text);
        assert_eq!(r.code(), "budget_store_unavailable", "{}", r.text);
        let after: u64 = r.h("retry-after").parse().expect("a Retry-After");
        assert!(after >= 1, "Retry-After {after}");
        // The cascade serves its small draft, capped.
        let mut body = chat_body("casc", &format!("hard one {i}"));
        if i % 2 == 1 {
            body = streamed(body);
        }
        let r = chat(&gw.url, &body).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.h("x-tandem-role"), "small", "{}", r.text);
        assert_eq!(r.h("x-tandem-capped"), "true");
    }
    assert_eq!(large.calls(), 2, "no large call while Redis is down");
    assert_eq!(small.calls(), 1 + 4);
    let h = health(&gw.url).await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["shared"]["reachable"], false, "{h}");
    assert_eq!(h["shared"]["redis"], redis.url(), "{h}");
    assert!(h["shared"]["replica"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));

    redis.restart();
    let url = gw.url.clone();
    until("a large call after Redis returned", 30, || {
        let url = url.clone();
        async move {
            let r = chat(&url, &chat_body("big", "back?")).await;
            if r.status == 503 {
                assert_eq!(r.code(), "budget_store_unavailable", "{}", r.text);
            }
            r.status == 200
        }
    })
    .await;
    let r = chat(&gw.url, &chat_body("casc", "hard again")).await;
    assert_eq!((r.status, r.h("x-tandem-role").as_str()), (200, "large"));
    assert_eq!(large.calls(), 4);
    until("/health ok again", 10, || {
        let url = url.clone();
        async move {
            let h = health(&url).await;
            h["status"] == "ok" && h["shared"]["reachable"] == true
        }
    })
    .await;
    // Redis kept its count through the restart and counts the calls since.
    assert_eq!(settled(&store, "big").await.calls, 2);
    assert_eq!(settled(&store, "casc").await.calls, 2);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. fail_open: a share of what remained, added to Redis when it returns
// ---------------------------------------------------------------------------------------------

/// Every large answer bills 5 input and 3 output tokens: 800 µ$ at $100 per million.
const OPEN_PER_CALL: u64 = 800;

/// Requests to `url` one at a time until one is refused; returns the number served and checks
/// the refusal is the fail-open share's.
async fn spend_until_refused(url: &str, what: &str) -> u64 {
    let mut served = 0;
    loop {
        assert!(served < 100, "{what}: never refused");
        let r = chat(url, &chat_body("big", &format!("{what} {served}"))).await;
        if r.status == 200 {
            served += 1;
            continue;
        }
        assert_eq!(r.status, 503, "{}", r.text);
        assert_eq!(r.code(), "budget_store_unavailable", "{}", r.text);
        assert!(r.text.contains("share"), "{}", r.text);
        return served;
    }
}

async fn serve_n(url: &str, n: usize, what: &str) {
    for i in 0..n {
        let r = chat(url, &chat_body("big", &format!("{what} {i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_open_within_the_share_and_catches_up_when_it_returns() {
    let Some(mut redis) = Redis::start_with(DURABLE) else {
        return;
    };
    let (large, l_url) = mock(reply(|_| ("unused".into(), -0.1))).await;
    large.set_always(Some(Scripted::text("an answer")));
    let cfg = format!(
        "{}{}[[route]]\nname = \"big\"\nkind = \"fixed\"\nupstream = \"large\"\n\
         [route.budget]\nmax_calls = 40\n",
        server(
            &redis,
            "open",
            "on_redis_down = { mode = \"fail_open\", share = 0.25 }\nop_timeout_ms = 2000"
        ),
        upstream("large", &l_url, "token:100:100"),
    );
    let dir = tempfile::tempdir().unwrap();
    let a = start(&cfg, dir.path()).await;
    let b = start(&cfg, dir.path()).await;
    let store = reader(&redis, "open");
    // A: 4 calls, B: 4, A: 1 more. A last heard 9 calls counted, B 8.
    serve_n(&a.url, 4, "a").await;
    settled(&store, "big").await;
    serve_n(&b.url, 4, "b").await;
    settled(&store, "big").await;
    serve_n(&a.url, 1, "a again").await;
    let s = settled(&store, "big").await;
    assert_eq!((s.calls, s.micros), (9, 9 * OPEN_PER_CALL));

    redis.kill();
    // Each spends a quarter of what remained when it last heard, then refuses.
    let by_a = spend_until_refused(&a.url, "a alone").await;
    let by_b = spend_until_refused(&b.url, "b alone").await;
    assert_eq!(by_a, (40 - 9) / 4, "A: a quarter of the 31 calls left");
    assert_eq!(by_b, (40 - 8) / 4, "B: a quarter of the 32 calls left");
    let calls = large.calls() as u64;
    assert_eq!(calls, 9 + by_a + by_b, "no other large call");
    // Refused again: the share is used once.
    assert_eq!(spend_until_refused(&a.url, "a again").await, 0);

    redis.restart();
    // Within a few seconds, what each spent alone is in Redis: counted = billed.
    let deadline = Instant::now() + Duration::from_secs(15);
    let s = loop {
        match store.spent("big", 0).await {
            Ok(s) if s.calls == calls => break s,
            Ok(s) => assert!(s.calls < calls, "{s:?}"),
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "local spend not added to Redis in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(s.micros, calls * OPEN_PER_CALL, "counted equals billed");
    assert_eq!(s.open, 0);
    // Shared again: the rest of the cap, and not a call more.
    let mut more = 0;
    for i in 0..40 {
        let url = if i % 2 == 0 { &a.url } else { &b.url };
        let r = chat(url, &chat_body("big", &format!("after {i}"))).await;
        match r.status {
            200 => more += 1,
            429 => assert_eq!(r.code(), "insufficient_quota", "{}", r.text),
            _ => panic!("{} {}", r.status, r.text),
        }
    }
    assert_eq!(calls + more, 40, "the cap of 40 calls, reached and kept");
    assert_eq!(large.calls() as u64, 40);
    let s = settled(&store, "big").await;
    assert_eq!((s.calls, s.micros), (40, 40 * OPEN_PER_CALL));
    a.stop().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Feedback: any replica, once
// ---------------------------------------------------------------------------------------------

const ROUTE_BEFORE: &str = "[[route]]\nname = \"rb\"\nkind = \"route_before\"\nsmall = \"small\"\n\
    large = \"large\"\ntarget_share = 0.5\nexplore = 0.0\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_is_taken_once_by_any_replica() {
    let Some(redis) = Redis::start() else { return };
    let (_small, s_url) = mock(small_reply()).await;
    let (_large, l_url) = mock(large_reply()).await;
    let cfg = format!(
        "{}{}{}{ROUTE_BEFORE}",
        server(&redis, "feedback", "op_timeout_ms = 1000"),
        upstream("small", &s_url, "token:1:1"),
        upstream("large", &l_url, "token:10:30"),
    );
    let dir = tempfile::tempdir().unwrap();
    let a = start(&cfg, dir.path()).await;
    let b = start(&cfg, dir.path()).await;
    let fb = |id: &str, v: Value| {
        let mut v = v;
        v["response_id"] = json!(id);
        v
    };
    let mut ids = Vec::new();
    for i in 0..8 {
        let mut body = chat_body("rb", &format!("question number {i}"));
        if i % 3 == 2 {
            body = streamed(body);
        }
        let r = chat(&a.url, &body).await;
        assert_eq!(r.status, 200, "{}", r.text);
        if i % 3 == 2 {
            assert_clean_stream(&r);
        }
        ids.push(r.id());
    }
    for (i, id) in ids.iter().enumerate() {
        // The feedback goes to the other replica (A, the one that served, for every fourth).
        let (first, other) = if i % 4 == 3 { (&a, &b) } else { (&b, &a) };
        if i % 2 == 0 {
            // Bad feedback is refused and does not consume the response, on either replica.
            for at in [first, other] {
                let r = feedback(&at.url, fb(id, json!({"score": 1.5}))).await;
                assert_eq!(r.status, 400, "{}", r.text);
            }
        }
        let r = feedback(&first.url, fb(id, json!({"correct": true}))).await;
        assert_eq!(r.status, 200, "response {i}: {}", r.text);
        // A miss waits for a record that may still be on its way (the store's op_timeout):
        // both asked at once.
        let (x, y) = tokio::join!(
            feedback(&other.url, fb(id, json!({"score": 0.5}))),
            feedback(&first.url, fb(id, json!({"correct": false}))),
        );
        for r in [x, y] {
            assert_eq!(r.status, 404, "response {i}: a second feedback: {}", r.text);
        }
    }
    // Feedback sent the moment its answer arrives, to the other replica (the record is written
    // off the request path, and may land just after).
    let client = reqwest::Client::new();
    for i in 0..300 {
        let (serve, take) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let mut body = chat_body("rb", &format!("quick question {i}"));
        if i % 3 == 0 {
            body = streamed(body);
        }
        let r = send(&client, &serve.url, "/v1/chat/completions", &body).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let f = send(
            &client,
            &take.url,
            "/v1/feedback",
            &fb(&r.id(), json!({"score": 0.75})),
        )
        .await;
        assert_eq!(f.status, 200, "right after response {i}: {}", f.text);
    }
    let r = feedback(&b.url, fb("chatcmpl-unknown", json!({"correct": true}))).await;
    assert_eq!(r.status, 404, "{}", r.text);
    let counted = |gw: &Running| {
        gw.gateway.routes()[0]
            .counters
            .feedback
            .load(Ordering::SeqCst)
    };
    assert_eq!(
        (counted(&a), counted(&b)),
        (2 + 150, 6 + 150),
        "each feedback counted where it was given"
    );
    a.stop().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Learning reaches every replica, and a fresh one replays it
// ---------------------------------------------------------------------------------------------

/// Two learning routes: a learned prompt router and a learned cascade.
const LEARNERS: &str = "[[route]]\nname = \"rb\"\nkind = \"route_before\"\nsmall = \"small\"\n\
    large = \"large\"\ntarget_share = 0.5\nexplore = 0.0\n\
    [[route]]\nname = \"lc\"\nkind = \"cascade\"\ngate = \"learned\"\nsmall = \"small\"\n\
    large = \"large\"\ntarget_share = 0.5\nexplore = 0.0\n";

/// The routers' scores for probe prompts of both kinds (not learned from), by route.
async fn probe_scores(url: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for route in ["rb", "lc"] {
        for i in 0..6 {
            let text = if i % 2 == 0 {
                format!("give a proof of probe lemma {i}")
            } else {
                format!("what is the capital of probe country {i}")
            };
            let r = chat(url, &no_learn(chat_body(route, &text))).await;
            assert_eq!(r.status, 200, "{}", r.text);
            out.push(r.h("x-tandem-score").parse().unwrap());
        }
    }
    out
}

/// Mean score of proof probes minus capital probes, on route `r` (0: rb, 1: lc).
fn gap(scores: &[f64], r: usize) -> f64 {
    let s = &scores[r * 6..r * 6 + 6];
    (s[0] + s[2] + s[4] - s[1] - s[3] - s[5]) / 3.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_replica_learns_reaches_the_others_and_a_fresh_one() {
    let Some(redis) = Redis::start() else { return };
    let (_small, s_url) = mock(small_reply()).await;
    let (_large, l_url) = mock(large_reply()).await;
    let cfg = format!(
        "{}{}{}{LEARNERS}",
        server(&redis, "learn", ""),
        upstream("small", &s_url, "token:1:1"),
        upstream("large", &l_url, "token:10:30"),
    );
    let dir = tempfile::tempdir().unwrap();
    let a = start(&cfg, dir.path()).await;
    let b = start(&cfg, dir.path()).await;
    let before = probe_scores(&b.url).await;
    assert_eq!((learned(&a, 0), learned(&b, 0)), (0, 0));

    // Only A gets traffic and feedback: the small model fails proofs, answers capitals right.
    for i in 0..120 {
        let route = if i % 3 == 2 { "lc" } else { "rb" };
        let proof = (i / 3) % 2 == 0;
        let text = if proof {
            format!("give a proof of lemma {i}")
        } else {
            format!("what is the capital of country {i}")
        };
        let r = chat(&a.url, &chat_body(route, &text)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let large = r.h("x-tandem-role") == "large";
        let correct = large || !proof;
        let f = feedback(&a.url, json!({"response_id": r.id(), "correct": correct})).await;
        assert_eq!(f.status, 200, "{}", f.text);
    }
    // Everything A was taught is applied (the learner works off the request path).
    a.gateway.flush().await.unwrap();
    let (rb, lc) = (learned(&a, 0), learned(&a, 1));
    assert!(rb >= 80 && lc >= 40, "A learned {rb} and {lc} events");
    // B applies every one of them within a few seconds, having served none.
    let b_ref = &b;
    until("B learned what A learned", 10, || async move {
        learned(b_ref, 0) == rb && learned(b_ref, 1) == lc
    })
    .await;
    assert_eq!(
        b.gateway.routes()[0]
            .counters
            .requests
            .load(Ordering::SeqCst),
        6
    );
    a.gateway.flush().await.unwrap();
    b.gateway.flush().await.unwrap();
    let on_a = probe_scores(&a.url).await;
    let on_b = probe_scores(&b.url).await;
    println!("learning: before {before:?}\n  on A {on_a:?}\n  on B {on_b:?}");
    // The same events in the same order: the same models.
    for (x, y) in on_a.iter().zip(&on_b) {
        assert!((x - y).abs() < 1e-3, "A scores {on_a:?}, B {on_b:?}");
    }
    // And B's routers learned the lesson: proofs now score above capitals.
    assert!(
        gap(&on_b, 0) > gap(&before, 0) + 0.05,
        "rb: before {before:?}, after {on_b:?}"
    );
    assert!(
        gap(&on_b, 1) > gap(&before, 1) + 0.05,
        "lc: before {before:?}, after {on_b:?}"
    );
    // Probes taught nothing: the counters stand.
    assert_eq!((learned(&a, 0), learned(&b, 0)), (rb, rb));

    // A third replica, started fresh, replays the streams.
    let c = start(&cfg, dir.path()).await;
    let c_ref = &c;
    until(
        "the fresh replica replayed the streams",
        10,
        || async move { learned(c_ref, 0) == rb && learned(c_ref, 1) == lc },
    )
    .await;
    c.gateway.flush().await.unwrap();
    let on_c = probe_scores(&c.url).await;
    for (x, y) in on_a.iter().zip(&on_c) {
        assert!((x - y).abs() < 1e-3, "A scores {on_a:?}, C {on_c:?}");
    }
    // A response served by B, its feedback given at A: all three learn it.
    let r = chat(&b.url, &chat_body("rb", "give a proof of lemma 9999")).await;
    let f = feedback(&a.url, json!({"response_id": r.id(), "correct": false})).await;
    assert_eq!(f.status, 200, "{}", f.text);
    let a_ref = &a;
    until("one more event everywhere", 10, || async move {
        [a_ref, b_ref, c_ref]
            .iter()
            .all(|gw| learned(gw, 0) == rb + 1)
    })
    .await;
    for r in [a, b, c] {
        r.stop().await;
    }
}
