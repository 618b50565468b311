//! `tandem bench gateway`: the gateway's own overhead under load. An instant mock upstream on
//! loopback; the same open-loop load sent to the mock directly, through `tandem serve` (a separate
//! process, as deployed) and through LiteLLM's proxy when it is installed; latency percentiles side
//! by side, and tandem's own overhead histogram (request time less upstream time) from `/metrics`.

pub mod faults;
pub mod load;

use axum::routing::post;
use axum::Router;
use load::{Load, LoadResult};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

pub struct Options {
    /// Rates for the mock alone and tandem.
    pub rates: Vec<f64>,
    /// Rates at which LiteLLM is compared (it saturates far below tandem's rates).
    pub compare_rates: Vec<f64>,
    pub seconds: f64,
    /// The `tandem` executable to run as `tandem serve`.
    pub tandem: PathBuf,
    /// Where LiteLLM is installed (`pip --target`); None: leave it out.
    pub litellm: Option<PathBuf>,
    pub work_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    #[serde(flatten)]
    pub load: LoadResult,
    /// p50 and p99 latency less the mock's alone at the same rate, in the same run.
    pub added_p50_ms: Option<f64>,
    pub added_p99_ms: Option<f64>,
    /// tandem only: its own overhead histogram over this load (upper bucket bounds).
    pub overhead_p50_ms: Option<f64>,
    pub overhead_p99_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub seconds: f64,
    pub cores: usize,
    pub rows: Vec<Row>,
    pub litellm: Option<String>,
}

const BODY: &str = r#"{"model":"bench","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":8}"#;

/// A chat completion, pre-serialised: the mock answers instantly.
const ANSWER: &str = r#"{"id":"mock-1","object":"chat.completion","created":0,"model":"mock","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":1,"total_tokens":13}}"#;

async fn start_mock() -> Result<String, BenchError> {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(|_body: bytes::Bytes| async {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                ANSWER,
            )
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io("binding the mock upstream"))?;
    let addr = l.local_addr().map_err(io("the mock's address"))?;
    tokio::spawn(async move {
        let l = axum::serve::ListenerExt::tap_io(l, |t| {
            let _ = t.set_nodelay(true);
        });
        let _ = axum::serve(l, app).await;
    });
    Ok(format!("http://{addr}/v1"))
}

/// A child process killed when dropped, so a failed bench leaves nothing running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, BenchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(l.local_addr().map_err(io("finding a free port"))?.port())
}

async fn wait_ready(
    client: &reqwest::Client,
    url: &str,
    what: &str,
    p: &mut Proc,
) -> Result<(), BenchError> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(120) {
        if let Ok(Some(status)) = p.0.try_wait() {
            return Err(BenchError::Setup(format!(
                "{what} exited at start ({status}); see its log"
            )));
        }
        if client
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(BenchError::Setup(format!(
        "{what} did not become ready at {url} within 120 s"
    )))
}

fn log_file(dir: &Path, name: &str) -> Result<Stdio, BenchError> {
    let f = std::fs::File::create(dir.join(name)).map_err(io(format!("creating {name}")))?;
    Ok(Stdio::from(f))
}

async fn start_tandem(
    o: &Options,
    mock: &str,
    client: &reqwest::Client,
) -> Result<(Proc, String), BenchError> {
    let port = free_port()?;
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[[upstream]]\nname = \"mock\"\nkind = \"openai\"\nbase_url = \"{mock}\"\nmodel = \"mock\"\nprice = \"token:1:2\"\n\n[[route]]\nname = \"bench\"\nkind = \"fixed\"\nupstream = \"mock\"\n"
    );
    let path = o.work_dir.join("tandem-bench.toml");
    std::fs::write(&path, cfg).map_err(io(format!("writing {}", path.display())))?;
    let child = Command::new(&o.tandem)
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log_file(&o.work_dir, "tandem.log")?)
        .spawn()
        .map_err(io(format!("starting {}", o.tandem.display())))?;
    let mut p = Proc(child);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(client, &format!("{base}/health"), "tandem serve", &mut p).await?;
    Ok((p, base))
}

async fn start_litellm(
    dir: &Path,
    o: &Options,
    mock: &str,
    client: &reqwest::Client,
) -> Result<(Proc, String), BenchError> {
    let port = free_port()?;
    let cfg = format!(
        "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/mock\n      api_base: {mock}\n      api_key: sk-none\n"
    );
    let path = o.work_dir.join("litellm-bench.yaml");
    std::fs::write(&path, cfg).map_err(io(format!("writing {}", path.display())))?;
    let launcher = "import sys\nfrom litellm.proxy.proxy_cli import run_server\nsys.argv = ['litellm'] + sys.argv[1:]\nrun_server()\n";
    let child = Command::new("python3")
        .args(["-c", launcher, "--config"])
        .arg(&path)
        .args(["--port", &port.to_string(), "--num_workers", "1"])
        .env("PYTHONPATH", dir)
        // Offline: the bundled model-cost map, no telemetry.
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_TELEMETRY", "False")
        .env("LITELLM_LOG", "ERROR")
        .stdout(log_file(&o.work_dir, "litellm.out.log")?)
        .stderr(log_file(&o.work_dir, "litellm.log")?)
        .spawn()
        .map_err(io("starting LiteLLM's proxy with python3"))?;
    let mut p = Proc(child);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(
        client,
        &format!("{base}/health/liveliness"),
        "LiteLLM's proxy",
        &mut p,
    )
    .await?;
    Ok((p, base))
}

/// Cumulative bucket counts of `tandem_overhead_seconds` from a Prometheus text page.
fn overhead_buckets(page: &str) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix("tandem_overhead_seconds_bucket{") else {
            continue;
        };
        let Some((labels, count)) = rest.split_once("} ") else {
            continue;
        };
        let le = labels
            .split(',')
            .find_map(|kv| kv.strip_prefix("le=\""))
            .map(|v| v.trim_end_matches('"'));
        let le = match le {
            Some("+Inf") => f64::INFINITY,
            Some(v) => v.parse().unwrap_or(f64::NAN),
            None => continue,
        };
        if let Ok(c) = count.trim().parse::<f64>() {
            out.push((le, c));
        }
    }
    out
}

/// The q-quantile (as the upper bound of its bucket, in ms) of the observations between two scrapes.
fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let diff: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, c)| {
            let b = before.iter().find(|(l, _)| *l == le).map_or(0.0, |x| x.1);
            (le, c - b)
        })
        .collect();
    let total = diff.iter().map(|x| x.1).fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    diff.iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| le * 1e3)
}

async fn scrape(client: &reqwest::Client, base: &str) -> Vec<(f64, f64)> {
    match client.get(format!("{base}/metrics")).send().await {
        Ok(r) => overhead_buckets(&r.text().await.unwrap_or_default()),
        Err(_) => Vec::new(),
    }
}

pub async fn run(o: Options, mut progress: impl FnMut(&str)) -> Result<Report, BenchError> {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(4096)
        .build()
        .map_err(|e| BenchError::Setup(format!("HTTP client: {e}")))?;
    let mock = start_mock().await?;
    let (_tandem, tandem) = start_tandem(&o, &mock, &client).await?;
    let litellm = match &o.litellm {
        Some(dir) => Some(start_litellm(dir, &o, &mock, &client).await?),
        None => None,
    };
    let body = bytes::Bytes::from_static(BODY.as_bytes());
    let duration = Duration::from_secs_f64(o.seconds);
    let mut rows = Vec::new();
    let mut rates: Vec<(f64, bool)> = o.rates.iter().map(|&r| (r, false)).collect();
    if litellm.is_some() {
        rates.extend(o.compare_rates.iter().map(|&r| (r, true)));
    }
    rates.sort_by(|a, b| a.0.total_cmp(&b.0));
    rates.dedup_by(|a, b| {
        a.0 == b.0 && {
            b.1 |= a.1;
            true
        }
    });
    let mock_url = format!("{mock}/chat/completions");
    let tandem_url = format!("{tandem}/v1/chat/completions");
    // Warm the connection pools and the gateway before measuring.
    for url in [&mock_url, &tandem_url] {
        let _ = load::run(
            &client,
            Load {
                target: "warm-up",
                url,
                body: body.clone(),
                rate: 200.0,
                duration: Duration::from_millis(500),
                max_in_flight: 512,
            },
        )
        .await;
    }
    for (rate, with_litellm) in rates {
        let max_in_flight = ((rate * 0.5) as usize).clamp(256, 8192);
        progress(&format!("mock alone at {rate} req/s"));
        let direct = load::run(
            &client,
            Load {
                target: "mock alone",
                url: &mock_url,
                body: body.clone(),
                rate,
                duration,
                max_in_flight,
            },
        )
        .await;
        progress(&format!("tandem at {rate} req/s"));
        let before = scrape(&client, &tandem).await;
        let via = load::run(
            &client,
            Load {
                target: "tandem",
                url: &tandem_url,
                body: body.clone(),
                rate,
                duration,
                max_in_flight,
            },
        )
        .await;
        let after = scrape(&client, &tandem).await;
        let added = |r: &LoadResult| {
            (
                Some(r.p50_ms - direct.p50_ms),
                Some(r.p99_ms - direct.p99_ms),
            )
        };
        let (a50, a99) = added(&via);
        let t_row = Row {
            added_p50_ms: a50,
            added_p99_ms: a99,
            overhead_p50_ms: bucket_quantile(&before, &after, 0.5),
            overhead_p99_ms: bucket_quantile(&before, &after, 0.99),
            load: via,
        };
        let mut l_row = None;
        if let (true, Some((_, base))) = (with_litellm, &litellm) {
            progress(&format!("LiteLLM at {rate} req/s"));
            let url = format!("{base}/chat/completions");
            let r = load::run(
                &client,
                Load {
                    target: "litellm",
                    url: &url,
                    body: body.clone(),
                    rate,
                    duration,
                    max_in_flight,
                },
            )
            .await;
            let (a50, a99) = added(&r);
            l_row = Some(Row {
                added_p50_ms: a50,
                added_p99_ms: a99,
                overhead_p50_ms: None,
                overhead_p99_ms: None,
                load: r,
            });
        }
        rows.push(Row {
            load: direct,
            added_p50_ms: None,
            added_p99_ms: None,
            overhead_p50_ms: None,
            overhead_p99_ms: None,
        });
        rows.push(t_row);
        rows.extend(l_row);
    }
    Ok(Report {
        seconds: o.seconds,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        rows,
        litellm: o.litellm.map(|d| d.display().to_string()),
    })
}

/// The report as a table.
pub fn table(r: &Report) -> String {
    let mut s = format!(
        "gateway overhead, open-loop load for {} s per row on {} cores (mock, load generator and gateways share them)\n",
        r.seconds, r.cores
    );
    s.push_str(&format!(
        "{:<11} {:>8} {:>9} {:>7} {:>6} {:>9} {:>9} {:>10} {:>10} {:>12} {:>12}\n",
        "target",
        "rate/s",
        "done/s",
        "errors",
        "shed",
        "p50 ms",
        "p99 ms",
        "+p50 ms",
        "+p99 ms",
        "own p50 ms",
        "own p99 ms"
    ));
    let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3}"));
    for row in &r.rows {
        let l = &row.load;
        s.push_str(&format!(
            "{:<11} {:>8.0} {:>9.0} {:>7} {:>6} {:>9.3} {:>9.3} {:>10} {:>10} {:>12} {:>12}\n",
            l.target,
            l.rate,
            l.achieved,
            l.errors,
            l.shed,
            l.p50_ms,
            l.p99_ms,
            f(row.added_p50_ms),
            f(row.added_p99_ms),
            f(row.overhead_p50_ms),
            f(row.overhead_p99_ms)
        ));
    }
    s.push_str("+p50/+p99: latency less the mock's alone at the same rate, same run; own: tandem's histogram of request time less upstream time (bucket upper bounds).\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_quantiles_from_scrapes() {
        let before = "tandem_overhead_seconds_bucket{route=\"bench\",le=\"0.0001\"} 10\ntandem_overhead_seconds_bucket{route=\"bench\",le=\"0.001\"} 10\ntandem_overhead_seconds_bucket{route=\"bench\",le=\"+Inf\"} 10\n";
        let after = "tandem_overhead_seconds_bucket{route=\"bench\",le=\"0.0001\"} 60\ntandem_overhead_seconds_bucket{route=\"bench\",le=\"0.001\"} 109\ntandem_overhead_seconds_bucket{route=\"bench\",le=\"+Inf\"} 110\n";
        let (b, a) = (overhead_buckets(before), overhead_buckets(after));
        assert_eq!(a.len(), 3);
        assert_eq!(bucket_quantile(&b, &a, 0.5), Some(0.1));
        assert_eq!(bucket_quantile(&b, &a, 0.99), Some(1.0));
        assert_eq!(bucket_quantile(&b, &b, 0.5), None);
    }
}
