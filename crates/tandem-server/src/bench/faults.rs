//! `tandem bench faults`: the gateway against upstreams that fail. Each role of each route has two
//! upstreams (mock OpenAI endpoints on loopback, no key): in the first scenario one fails 30% of
//! its calls — 500, 503, 429 with `Retry-After`, a reset connection, a hang past the timeout,
//! garbage, a truncated body, drawn at random — and one is healthy; in the second both fail 10%.
//! Open-loop load, plain and streamed, cascade and fixed routes. Every request ends as `served` (a
//! valid completion), an `openai_error` (an OpenAI-shaped error, or an error event in a stream),
//! or `lost` (anything else, a hang included). The mocks bill each answer they complete; tandem's
//! count is the `tandem.cost_usd` it reported per request, and its budget's count of large calls.

use super::load::quantile;
use super::BenchError;
use crate::config::ServerConfig;
use crate::gateway::Gateway;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What `tandem bench faults` runs.
#[derive(Debug, Clone)]
pub struct FaultOptions {
    /// Requests per scenario.
    pub requests: usize,
    /// Requests per second (open loop).
    pub rate: f64,
    /// The degraded upstream's fault rate in the first scenario (0.3 in the issue).
    pub fault_rate: f64,
    /// Both upstreams' fault rate in the second scenario (0.1).
    pub both_rate: f64,
    pub seed: u64,
}

impl Default for FaultOptions {
    fn default() -> Self {
        FaultOptions {
            requests: 5_000,
            rate: 200.0,
            fault_rate: 0.3,
            both_rate: 0.1,
            seed: 7,
        }
    }
}

/// One scenario's outcome. Money in dollars (micro-dollar sums).
#[derive(Debug, Clone, Serialize)]
pub struct FaultRow {
    pub scenario: String,
    pub requests: u64,
    /// Valid completions (a whole answer with content, or a stream ending in `[DONE]`).
    pub served: u64,
    /// Neither a valid completion nor an OpenAI-shaped error (or no answer at all).
    pub lost: u64,
    pub openai_errors: u64,
    pub served_share: f64,
    /// What the mock upstreams billed: every answer they completed, at their prices.
    pub billed_usd: f64,
    /// What tandem reported spending (`tandem.cost_usd`, summed over requests).
    pub counted_usd: f64,
    /// What the large upstreams billed, and what the routes' budgets counted.
    pub billed_large_usd: f64,
    pub budget_usd: f64,
    /// Upstream calls that failed on purpose.
    pub faults_injected: u64,
    pub upstream_calls: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    pub requests_per_scenario: usize,
    pub rate: f64,
    pub seed: u64,
    pub rows: Vec<FaultRow>,
}

/// The ways a degraded mock fails, drawn uniformly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    S500,
    S503,
    S429,
    Reset,
    Hang,
    Garbage,
    Truncated,
}

const FAULTS: [Fault; 7] = [
    Fault::S500,
    Fault::S503,
    Fault::S429,
    Fault::Reset,
    Fault::Hang,
    Fault::Garbage,
    Fault::Truncated,
];

/// The gateway's timeout for every upstream; a hang lasts longer.
const TIMEOUT_MS: u64 = 800;
const HANG_MS: u64 = 2_500;
const PROMPT_TOKENS: u64 = 20;
const COMPLETION_TOKENS: u64 = 6;

struct MockState {
    fault_rate: f64,
    /// Micro-dollars per million tokens, input and output.
    price: (u64, u64),
    /// The small model: its answers carry log-probabilities (low on some prompts, so the cascade
    /// escalates them).
    small: bool,
    rng: Mutex<rand_chacha::ChaCha8Rng>,
    calls: AtomicU64,
    faults: AtomicU64,
    billed_micros: AtomicU64,
}

impl MockState {
    fn bill(&self) {
        let m = (PROMPT_TOKENS * self.price.0 + COMPLETION_TOKENS * self.price.1) / 1_000_000;
        self.billed_micros.fetch_add(m, Ordering::Relaxed);
    }

    fn draw(&self) -> Option<Fault> {
        let mut r = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        if r.gen_bool(self.fault_rate.clamp(0.0, 1.0)) {
            Some(FAULTS[r.gen_range(0..FAULTS.len())])
        } else {
            None
        }
    }
}

/// A mock OpenAI endpoint over raw HTTP/1.1, so that it can fail the way networks do: reset a
/// connection, hang, cut a body short.
async fn start_mock(state: Arc<MockState>) -> Result<String, BenchError> {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(super::io("binding a mock upstream"))?;
    let addr = l.local_addr().map_err(super::io("mock address"))?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let st = state.clone();
            tokio::spawn(async move {
                let _ = serve_conn(s, st).await;
            });
        }
    });
    Ok(format!("http://{addr}/v1"))
}

/// Reads one request (head and `Content-Length` body); None at the end of the connection.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Value>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 8192];
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(None);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body: Value =
                serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap_or(Value::Null);
            buf.drain(..end + 4 + len);
            return Ok(Some(body));
        }
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn head(status: &str, ctype: &str, len: Option<usize>, extra: &str) -> String {
    let len = len.map_or("Transfer-Encoding: chunked\r\n".to_string(), |l| {
        format!("Content-Length: {l}\r\n")
    });
    format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n{len}{extra}\r\n")
}

async fn serve_conn(mut s: TcpStream, st: Arc<MockState>) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut s, &mut buf).await? {
        st.calls.fetch_add(1, Ordering::Relaxed);
        let stream = req["stream"].as_bool() == Some(true);
        let fault = st.draw();
        if fault.is_some() {
            st.faults.fetch_add(1, Ordering::Relaxed);
        }
        let json_err = |status: &str, extra: &str| {
            let body = json!({"error": {"message": format!("mock says {status}"), "type": "server_error", "param": null, "code": null}}).to_string();
            format!(
                "{}{body}",
                head(status, "application/json", Some(body.len()), extra)
            )
        };
        match fault {
            Some(Fault::S500) => {
                s.write_all(json_err("500 Internal Server Error", "").as_bytes())
                    .await?
            }
            Some(Fault::S503) => {
                s.write_all(json_err("503 Service Unavailable", "").as_bytes())
                    .await?
            }
            Some(Fault::S429) => {
                s.write_all(json_err("429 Too Many Requests", "Retry-After: 1\r\n").as_bytes())
                    .await?
            }
            Some(Fault::Reset) => {
                // Closing with unread data makes the kernel send RST.
                let _ = s.set_zero_linger();
                return Ok(());
            }
            Some(Fault::Hang) => {
                tokio::time::sleep(Duration::from_millis(HANG_MS)).await;
                return Ok(());
            }
            Some(Fault::Garbage) => {
                let (ctype, body) = if stream {
                    ("text/event-stream", "data: {\"choices\": [oops\n\n")
                } else {
                    ("application/json", "{\"choices\": [oops")
                };
                s.write_all(
                    format!("{}{body}", head("200 OK", ctype, Some(body.len()), "")).as_bytes(),
                )
                .await?
            }
            Some(Fault::Truncated) => {
                // Headers promise more than is sent: the body is cut short (a stream after
                // OpenAI's opening chunk, which holds no answer yet).
                let part = if stream {
                    "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\ndata: {\"id\":\"x\",\"obj"
                } else {
                    "{\"id\":\"x\",\"object\":\"chat.comp"
                };
                let ctype = if stream {
                    "text/event-stream"
                } else {
                    "application/json"
                };
                s.write_all(format!("{}{part}", head("200 OK", ctype, Some(4096), "")).as_bytes())
                    .await?;
                return Ok(());
            }
            None => {
                let prompt = req["messages"][0]["content"].as_str().unwrap_or("");
                // The small model is unsure of about a third of the prompts.
                let lp = if st.small && fnv1a(prompt).is_multiple_of(3) {
                    -2.0
                } else {
                    -0.1
                };
                let logprobs = if st.small && req["logprobs"].as_bool() == Some(true) {
                    json!({"content": [{"token": "ok", "logprob": lp, "top_logprobs": [{"token": "ok", "logprob": lp}]}]})
                } else {
                    Value::Null
                };
                let usage = json!({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS, "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS});
                if stream {
                    let ev = |c: Value| format!("data: {c}\n\n");
                    let mut body = String::new();
                    let chunk = |delta: Value, finish: Value| json!({"id": "m", "object": "chat.completion.chunk", "created": 1, "model": "mock", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
                    body.push_str(&ev(chunk(
                        json!({"role": "assistant", "content": ""}),
                        Value::Null,
                    )));
                    body.push_str(&ev(chunk(json!({"content": "the answer "}), Value::Null)));
                    body.push_str(&ev(chunk(json!({"content": "is 4"}), Value::Null)));
                    body.push_str(&ev(chunk(json!({}), json!("stop"))));
                    if req["stream_options"]["include_usage"].as_bool() == Some(true) {
                        body.push_str(&ev(json!({"id": "m", "object": "chat.completion.chunk", "created": 1, "model": "mock", "choices": [], "usage": usage})));
                    }
                    body.push_str("data: [DONE]\n\n");
                    s.write_all(
                        format!(
                            "{}{body}",
                            head("200 OK", "text/event-stream", Some(body.len()), "")
                        )
                        .as_bytes(),
                    )
                    .await?;
                } else {
                    let body = json!({"id": "m", "object": "chat.completion", "created": 1, "model": "mock",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "the answer is 4"}, "logprobs": logprobs, "finish_reason": "stop"}],
                        "usage": usage}).to_string();
                    s.write_all(
                        format!(
                            "{}{body}",
                            head("200 OK", "application/json", Some(body.len()), "")
                        )
                        .as_bytes(),
                    )
                    .await?;
                }
                st.bill();
            }
        }
    }
    Ok(())
}

/// A stable hash of a prompt (FNV-1a), so the same prompts escalate in every run.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn upstream(name: &str, url: &str, price: &str, small: bool) -> String {
    format!(
        "[[upstream]]\nname = \"{name}\"\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"m\"\nprice = \"{price}\"\ntimeout_ms = {TIMEOUT_MS}\nstream_usage = true\n{}",
        if small { "logprobs = true\n" } else { "" }
    )
}

/// How one request ended.
enum Outcome {
    Served(f64),
    OpenaiError(f64),
    Lost,
}

fn is_openai_error(v: &Value) -> bool {
    v["error"]["message"].is_string() && v["error"]["type"].is_string()
}

async fn one(client: &reqwest::Client, url: &str, route: &str, stream: bool, i: usize) -> Outcome {
    let mut body = json!({"model": route, "messages": [{"role": "user", "content": format!("question {i}: what is 2 + 2?")}]});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let Ok(r) = client.post(url).json(&body).send().await else {
        return Outcome::Lost;
    };
    let status = r.status();
    let Ok(text) = r.text().await else {
        return Outcome::Lost;
    };
    if !status.is_success() {
        return match serde_json::from_str::<Value>(&text) {
            Ok(v) if is_openai_error(&v) => Outcome::OpenaiError(0.0),
            _ => Outcome::Lost,
        };
    }
    if !stream {
        return match serde_json::from_str::<Value>(&text) {
            Ok(v)
                if v["choices"][0]["message"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty()) =>
            {
                Outcome::Served(v["tandem"]["cost_usd"].as_f64().unwrap_or(0.0))
            }
            _ => Outcome::Lost,
        };
    }
    let (mut content, mut done, mut error, mut cost) = (String::new(), false, false, 0.0);
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return Outcome::Lost;
        };
        if is_openai_error(&v) {
            error = true;
        }
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(c);
        }
        if let Some(c) = v["tandem"]["cost_usd"].as_f64() {
            cost = c;
        }
    }
    match (done, error) {
        (true, false) if !content.is_empty() => Outcome::Served(cost),
        (_, true) => Outcome::OpenaiError(cost),
        _ => Outcome::Lost,
    }
}

/// Runs one scenario: `rates` are the fault rates of (small a, small b, large a, large b).
async fn scenario(
    name: &str,
    o: &FaultOptions,
    rates: [f64; 4],
    seed: u64,
) -> Result<FaultRow, BenchError> {
    let prices = [
        ("token:0.5:1.5", (500_000, 1_500_000), true),
        ("token:0.5:1.5", (500_000, 1_500_000), true),
        ("token:10:30", (10_000_000, 30_000_000), false),
        ("token:12:36", (12_000_000, 36_000_000), false),
    ];
    let mut mocks = Vec::new();
    let mut cfg = String::new();
    for (k, ((price, micro, small), rate)) in prices.iter().zip(rates).enumerate() {
        let st = Arc::new(MockState {
            fault_rate: rate,
            price: *micro,
            small: *small,
            rng: Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(
                seed.wrapping_add(k as u64),
            )),
            calls: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            billed_micros: AtomicU64::new(0),
        });
        let url = start_mock(st.clone()).await?;
        let names = ["small-a", "small-b", "large-a", "large-b"];
        cfg.push_str(&upstream(names[k], &url, price, *small));
        mocks.push(st);
    }
    cfg.push_str(
        "[[route]]\nname = \"fixed\"\nkind = \"fixed\"\nupstream = [\"large-a\", \"large-b\"]\n[route.budget]\nmax_usd = 1000.0\n\
         [[route]]\nname = \"cascade\"\nkind = \"cascade\"\nsmall = [\"small-a\", \"small-b\"]\nlarge = [\"large-a\", \"large-b\"]\nthreshold = 1.0\nexplore = 0.0\n[route.budget]\nmax_usd = 1000.0\n",
    );
    let parsed: ServerConfig =
        toml::from_str(&cfg).map_err(|e| BenchError::Setup(format!("bench config: {e}")))?;
    let v = parsed
        .validate(
            std::path::Path::new("bench-faults.toml"),
            std::env::temp_dir(),
        )
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let gw = Arc::new(Gateway::start(&v).map_err(|e| BenchError::Setup(e.to_string()))?);
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(super::io("binding the gateway"))?;
    let addr = l.local_addr().map_err(super::io("gateway address"))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::serve(gw.clone(), l, v.server.clone(), async move {
        let _ = stop_rx.await;
    }));
    let url = format!("http://{addr}/v1/chat/completions");
    // A hang is a lost request: nothing tandem does should take this long.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(o.requests);
    for i in 0..o.requests {
        let due = start + Duration::from_secs_f64(i as f64 / o.rate);
        tokio::time::sleep_until(due.into()).await;
        let (client, url) = (client.clone(), url.clone());
        let route = if i % 4 < 2 { "fixed" } else { "cascade" };
        let stream = i % 2 == 1;
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let out = one(&client, &url, route, stream, i).await;
            (out, t0.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let (mut served, mut lost, mut errors, mut counted) = (0u64, 0u64, 0u64, 0u64);
    let mut lat = Vec::with_capacity(o.requests);
    for t in tasks {
        match t.await {
            Ok((out, ms)) => {
                lat.push(ms);
                match out {
                    Outcome::Served(c) => {
                        served += 1;
                        counted += (c * 1e6).round() as u64;
                    }
                    Outcome::OpenaiError(c) => {
                        errors += 1;
                        counted += (c * 1e6).round() as u64;
                    }
                    Outcome::Lost => lost += 1,
                }
            }
            Err(_) => lost += 1,
        }
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    lat.sort_by(f64::total_cmp);
    let billed: u64 = mocks
        .iter()
        .map(|m| m.billed_micros.load(Ordering::Relaxed))
        .sum();
    let billed_large: u64 = mocks[2..]
        .iter()
        .map(|m| m.billed_micros.load(Ordering::Relaxed))
        .sum();
    let budget: u64 = gw.routes().iter().map(|r| r.budget.spent().micros).sum();
    let usd = |m: u64| m as f64 / 1e6;
    Ok(FaultRow {
        scenario: name.to_string(),
        requests: o.requests as u64,
        served,
        lost,
        openai_errors: errors,
        served_share: served as f64 / o.requests.max(1) as f64,
        billed_usd: usd(billed),
        counted_usd: usd(counted),
        billed_large_usd: usd(billed_large),
        budget_usd: usd(budget),
        faults_injected: mocks.iter().map(|m| m.faults.load(Ordering::Relaxed)).sum(),
        upstream_calls: mocks.iter().map(|m| m.calls.load(Ordering::Relaxed)).sum(),
        p50_ms: quantile(&lat, 0.5),
        p99_ms: quantile(&lat, 0.99),
    })
}

/// Runs both scenarios; `progress` hears what is happening.
pub async fn run(
    o: FaultOptions,
    mut progress: impl FnMut(&str),
) -> Result<FaultReport, BenchError> {
    let f = o.fault_rate;
    let b = o.both_rate;
    let mut rows = Vec::new();
    let one_name = format!("one of two upstreams fails {:.0}%", f * 100.0);
    progress(&format!(
        "{one_name}: {} requests at {}/s",
        o.requests, o.rate
    ));
    rows.push(scenario(&one_name, &o, [f, 0.0, f, 0.0], o.seed).await?);
    let both_name = format!("both upstreams fail {:.0}%", b * 100.0);
    progress(&format!(
        "{both_name}: {} requests at {}/s",
        o.requests, o.rate
    ));
    rows.push(scenario(&both_name, &o, [b, b, b, b], o.seed ^ 0xb0b).await?);
    Ok(FaultReport {
        requests_per_scenario: o.requests,
        rate: o.rate,
        seed: o.seed,
        rows,
    })
}

pub fn table(r: &FaultReport) -> String {
    let mut out = format!(
        "{:<34} {:>8} {:>8} {:>6} {:>8} {:>8} {:>11} {:>11} {:>11} {:>11} {:>8} {:>8}\n",
        "scenario",
        "requests",
        "served",
        "lost",
        "errors",
        "served%",
        "billed $",
        "counted $",
        "large $",
        "budget $",
        "p50 ms",
        "p99 ms"
    );
    for x in &r.rows {
        out.push_str(&format!(
            "{:<34} {:>8} {:>8} {:>6} {:>8} {:>7.2}% {:>11.6} {:>11.6} {:>11.6} {:>11.6} {:>8.1} {:>8.1}\n",
            x.scenario, x.requests, x.served, x.lost, x.openai_errors, x.served_share * 100.0, x.billed_usd, x.counted_usd, x.billed_large_usd, x.budget_usd, x.p50_ms, x.p99_ms
        ));
    }
    out
}
