//! `tandem serve` killed with SIGKILL (`kill -9`) and restarted, against a mock OpenAI upstream
//! that bills every call it receives: a budget never lets more through than its cap, and the
//! spend it reports after a restart is never below what the upstream billed. State files are
//! due only every hour here, so what survives comes from the spend journal.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Dollars per million tokens, both ways: 10 micro-dollars a token.
const PER_TOKEN: u64 = 10;

/// The mock provider: answers after a random pause, and bills each call when it arrives (a
/// provider bills the calls it accepts, whether or not the answer reaches anyone).
#[derive(Default)]
struct Mock {
    calls: AtomicU64,
    billed: AtomicU64,
    /// Pause before answering, in milliseconds, up to this.
    max_delay_ms: AtomicU64,
}

async fn complete(State(m): State<Arc<Mock>>, raw: axum::body::Bytes) -> Response {
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let n = m.calls.fetch_add(1, Ordering::SeqCst);
    // What it bills: a quarter of the body's bytes as prompt tokens, and 1 to `max_tokens`
    // completion tokens (what was asked for, at most).
    let prompt = raw.len() as u64 / 4;
    let cap = body["max_tokens"].as_u64().unwrap_or(8).max(1);
    let completion = 1 + n % cap;
    m.billed
        .fetch_add((prompt + completion) * PER_TOKEN, Ordering::SeqCst);
    let max_delay = m.max_delay_ms.load(Ordering::SeqCst);
    if max_delay > 0 {
        // A cheap spread of pauses, without a shared generator.
        let d = (n * 7919) % (max_delay + 1);
        tokio::time::sleep(Duration::from_millis(d)).await;
    }
    let text = vec!["word"; completion as usize].join(" ");
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion,
                       "total_tokens": prompt + completion});
    if body["stream"].as_bool().unwrap_or(false) {
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "m", "object": "chat.completion.chunk", "created": 0, "model": "large",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        let mut events = vec![
            chunk(json!({"role": "assistant", "content": text}), Value::Null),
            chunk(json!({}), json!("stop")),
        ];
        if body["stream_options"]["include_usage"].as_bool() == Some(true) {
            events.push(
                json!({"id": "m", "object": "chat.completion.chunk", "created": 0,
                               "model": "large", "choices": [], "usage": usage}),
            );
        }
        let mut sse: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
        sse.push_str("data: [DONE]\n\n");
        return ([("content-type", "text/event-stream")], sse).into_response();
    }
    Json(json!({
        "id": "m", "object": "chat.completion", "created": 0, "model": "large",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": usage,
    }))
    .into_response()
}

async fn mock() -> (Arc<Mock>, String) {
    let m = Arc::new(Mock::default());
    let app = Router::new()
        .route("/v1/chat/completions", post(complete))
        .with_state(m.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (m, format!("http://{addr}/v1"))
}

/// A gateway config: one fixed route `capped` on the mock, refusing when its budget is spent.
fn config(dir: &Path, upstream: &str, budget: &str) -> std::path::PathBuf {
    let text = format!(
        r#"[server]
listen = "127.0.0.1:0"
state_dir = "state"
persist_interval_s = 3600

[[upstream]]
name = "large"
kind = "openai"
base_url = "{upstream}"
model = "large-model"
price = "token:{PER_TOKEN}:{PER_TOKEN}"
stream_usage = true
timeout_ms = 5000

[[route]]
name = "capped"
kind = "fixed"
upstream = "large"
on_exhausted = "refuse"
max_tokens = 8
[route.budget]
{budget}
"#
    );
    let p = dir.join("tandem.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// `tandem serve` as a child process; its stderr (one log line per request) is drained.
struct Served {
    child: Child,
    url: String,
}

fn serve(cfg: &Path) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["serve", "--config"])
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tandem serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("on http://").nth(1) {
                if let Some(t) = tx.take() {
                    let addr = rest.split('/').next().unwrap_or("").to_string();
                    let _ = t.send(addr);
                }
            } else if tx.is_some() && line.contains("error") {
                eprintln!("tandem: {line}");
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("tandem serve did not start");
    Served {
        child,
        url: format!("http://{addr}"),
    }
}

impl Served {
    /// SIGKILL: no shutdown, no save.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

async fn chat(client: &reqwest::Client, url: &str, i: u64, stream: bool) -> Option<u16> {
    let mut body = json!({"model": "capped",
                          "messages": [{"role": "user", "content": format!("question {i}")}]});
    if stream {
        body["stream"] = json!(true);
    }
    let r = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    // Read the whole answer (a stream to its end).
    r.bytes().await.ok()?;
    Some(status)
}

/// The route's budget spend as `/metrics` reports it, in micro-dollars and calls.
async fn reported(url: &str) -> (u64, u64) {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> u64 {
        let prefix = format!("{name}{{route=\"capped\"}} ");
        let line = text
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"));
        line[prefix.len()..].trim().parse::<f64>().unwrap() as u64
    };
    (
        value("tandem_budget_spent_micros"),
        value("tandem_budget_calls"),
    )
}

/// `max_calls = 1`: one call, `kill -9`, restart: the second call is refused, and the upstream
/// saw one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_call_cap_holds_across_kill_9() {
    let (m, upstream) = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &upstream, "max_calls = 1");
    let client = reqwest::Client::new();
    let gw = serve(&cfg);
    assert_eq!(chat(&client, &gw.url, 1, false).await, Some(200));
    gw.kill9();
    assert!(
        !dir.path().join("state/capped.state").exists(),
        "no state file was saved: what survives is the journal"
    );
    let gw = serve(&cfg);
    let r = client
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&json!({"model": "capped", "messages": [{"role": "user", "content": "again"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "insufficient_quota", "{e}");
    assert_eq!(reported(&gw.url).await.1, 1);
    // Streamed too.
    assert_eq!(chat(&client, &gw.url, 2, true).await, Some(429));
    assert_eq!(m.calls.load(Ordering::SeqCst), 1);
    gw.kill9();
}

/// 16 clients (every other request streamed) until `stop` is set, the gateway goes away, or —
/// with `until_refused` — each was refused; returns (served, refused).
async fn load(
    client: &reqwest::Client,
    url: &str,
    stop: &Arc<AtomicBool>,
    until_refused: bool,
) -> Vec<tokio::task::JoinHandle<(u64, u64)>> {
    (0..16u64)
        .map(|c| {
            let (client, url, stop) = (client.clone(), url.to_string(), stop.clone());
            tokio::spawn(async move {
                let (mut served, mut refused, mut i) = (0, 0, 0);
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    match chat(&client, &url, c * 1_000_000 + i, (c + i) % 2 == 0).await {
                        Some(200) => served += 1,
                        Some(429) => {
                            refused += 1;
                            if until_refused {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        // The gateway is gone (killed).
                        _ => break,
                    }
                }
                (served, refused)
            })
        })
        .collect()
}

async fn join(tasks: Vec<tokio::task::JoinHandle<(u64, u64)>>) -> (u64, u64) {
    let mut total = (0, 0);
    for t in tasks {
        let (s, r) = t.await.unwrap();
        total = (total.0 + s, total.1 + r);
    }
    total
}

/// `kill -9` at seeded random moments under 16 concurrent clients (plain and streamed) with a
/// dollar cap: after every restart the reported spend is at least what the upstream billed, and
/// the upstream never billed more than the cap — also once the last run has spent it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_never_loses_spend_or_passes_the_cap() {
    const CAP_MICROS: u64 = 1_000_000;
    const KILLS: usize = 10;
    let (m, upstream) = mock().await;
    m.max_delay_ms.store(40, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &upstream,
        &format!("max_usd = {}", CAP_MICROS as f64 / 1e6),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let client = reqwest::Client::new();
    let started = Instant::now();
    let (mut served, mut refused) = (0, 0);
    let check = |round: usize, spent: u64, calls: u64| {
        let billed = m.billed.load(Ordering::SeqCst);
        let upstream_calls = m.calls.load(Ordering::SeqCst);
        eprintln!(
            "round {round}: reported {spent} µ$ in {calls} calls; upstream billed {billed} µ$ for {upstream_calls} calls"
        );
        assert!(
            spent >= billed,
            "round {round}: the gateway reports {spent} µ$ but the upstream billed {billed} µ$"
        );
        assert!(calls >= upstream_calls, "round {round}: calls lost");
        assert!(
            billed <= CAP_MICROS,
            "round {round}: billed {billed} µ$ over the cap"
        );
    };
    for round in 0..KILLS {
        let gw = serve(&cfg);
        let (spent, calls) = reported(&gw.url).await;
        check(round, spent, calls);
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = load(&client, &gw.url, &stop, false).await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(150..700))).await;
        gw.kill9();
        stop.store(true, Ordering::SeqCst);
        let (s, r) = join(tasks).await;
        eprintln!("round {round}: {s} served, {r} refused, then kill -9");
        served += s;
        refused += r;
        // Requests the dead process had already sent may still reach the mock.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The last run spends what is left, until every client is refused.
    let gw = serve(&cfg);
    let (spent, calls) = reported(&gw.url).await;
    check(KILLS, spent, calls);
    let stop = Arc::new(AtomicBool::new(false));
    let (s, r) = join(load(&client, &gw.url, &stop, true).await).await;
    served += s;
    refused += r;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (spent, calls) = reported(&gw.url).await;
    check(KILLS + 1, spent, calls);
    gw.kill9();
    let billed = m.billed.load(Ordering::SeqCst);
    eprintln!(
        "{KILLS} kills in {:.1} s: {served} answers served, {refused} refused over the cap, {} upstream calls billed {billed} µ$ of a {CAP_MICROS} µ$ cap",
        started.elapsed().as_secs_f64(),
        m.calls.load(Ordering::SeqCst)
    );
    assert!(refused >= 16, "every client of the last run ends refused");
}
