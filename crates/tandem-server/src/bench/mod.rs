//! `tandem bench gateway`: the gateway's own overhead under load. An instant mock upstream on
//! loopback; the same open-loop load sent to the mock directly, through `tandem serve` (a separate
//! process, as deployed) and through LiteLLM's proxy when it is installed; latency percentiles side
//! by side, tandem's own overhead histogram (request time less upstream time) from `/metrics`,
//! and each gateway process's CPU time over its rows (Linux: `/proc/PID/stat`).
//!
//! Several `tandem` builds can be benched in one run (before and after a change): each is
//! started once, and at every rate they take turns, in an order rotated at each repetition, so
//! that a machine busy with something else weighs on them alike. With repetitions, each column
//! of a row is its median over them.

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
    // The cause is in the message and not chained as a source: a chain printer (anyhow's
    // `{:#}`) would repeat it.
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |error| BenchError::Io { what, error }
}

pub struct Options {
    /// Rates for the mock alone and tandem.
    pub rates: Vec<f64>,
    /// Rates at which LiteLLM is compared (it saturates far below tandem's rates).
    pub compare_rates: Vec<f64>,
    pub seconds: f64,
    /// The `tandem` executables to run as `tandem serve`, each with its label in the table.
    pub tandem: Vec<(String, PathBuf)>,
    /// Times the whole sequence of rows is run; each column is reported as its median.
    pub repeat: usize,
    /// `RUST_LOG` for the gateways (`warn`: no request log; `info`: a line per request).
    pub log: String,
    /// Worker threads of each gateway's runtime (`TOKIO_WORKER_THREADS`); None: tokio's default,
    /// one per core.
    pub gateway_threads: Option<usize>,
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
    /// The gateway process's CPU time (user and system) over this row's load, in seconds; for
    /// the mock alone, the bench's own process (load generator and mock together). None where
    /// it cannot be read.
    pub cpu_s: Option<f64>,
    /// `cpu_s` per request completed, in microseconds.
    pub cpu_us_per_req: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub seconds: f64,
    pub cores: usize,
    pub gateway_threads: Option<usize>,
    pub log: String,
    pub repeat: usize,
    /// Each column the median over the repetitions.
    pub rows: Vec<Row>,
    /// Every repetition's rows, in the order they were run (with repetitions only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<Vec<Row>>,
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

/// CPU time (user and system, all threads) a process has used so far, in seconds; None where
/// `/proc` is not there to read it.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses: state is the 3rd
    // field, utime and stime the 14th and 15th, in clock ticks (USER_HZ, 100 on Linux).
    let rest = stat.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace().skip(11);
    let utime: f64 = f.next()?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

async fn start_tandem(
    o: &Options,
    (index, bin): (usize, &Path),
    mock: &str,
    client: &reqwest::Client,
) -> Result<(Proc, String), BenchError> {
    let port = free_port()?;
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[[upstream]]\nname = \"mock\"\nkind = \"openai\"\nbase_url = \"{mock}\"\nmodel = \"mock\"\nprice = \"token:1:2\"\n\n[[route]]\nname = \"bench\"\nkind = \"fixed\"\nupstream = \"mock\"\n"
    );
    // One gateway: the names of old; several: numbered in the order given.
    let suffix = match o.tandem.len() {
        1 => String::new(),
        _ => format!("-{index}"),
    };
    let path = o.work_dir.join(format!("tandem-bench{suffix}.toml"));
    std::fs::write(&path, cfg).map_err(io(format!("writing {}", path.display())))?;
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", &o.log)
        .env_remove("TOKIO_WORKER_THREADS");
    if let Some(n) = o.gateway_threads {
        cmd.env("TOKIO_WORKER_THREADS", n.to_string());
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(log_file(&o.work_dir, &format!("tandem{suffix}.log"))?)
        .spawn()
        .map_err(io(format!("starting {}", bin.display())))?;
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

/// A gateway under test: its process, base URL and label.
struct Target {
    label: String,
    proc: Proc,
    base: String,
    url: String,
    tandem: bool,
}

/// Runs one load at `rate` against `t`, with its CPU time and (tandem) overhead histogram.
async fn measure(
    client: &reqwest::Client,
    t: &Target,
    body: &bytes::Bytes,
    rate: f64,
    duration: Duration,
    direct: &LoadResult,
) -> Row {
    let max_in_flight = ((rate * 0.5) as usize).clamp(256, 8192);
    let before = if t.tandem {
        scrape(client, &t.base).await
    } else {
        Vec::new()
    };
    let cpu0 = cpu_seconds(t.proc.0.id());
    let r = load::run(
        client,
        Load {
            target: &t.label,
            url: &t.url,
            body: body.clone(),
            rate,
            duration,
            max_in_flight,
        },
    )
    .await;
    let cpu_s = cpu0.zip(cpu_seconds(t.proc.0.id())).map(|(a, b)| b - a);
    let (o50, o99) = if t.tandem {
        let after = scrape(client, &t.base).await;
        (
            bucket_quantile(&before, &after, 0.5),
            bucket_quantile(&before, &after, 0.99),
        )
    } else {
        (None, None)
    };
    Row {
        added_p50_ms: Some(r.p50_ms - direct.p50_ms),
        added_p99_ms: Some(r.p99_ms - direct.p99_ms),
        overhead_p50_ms: o50,
        overhead_p99_ms: o99,
        cpu_us_per_req: cpu_s.filter(|_| r.ok > 0).map(|c| c * 1e6 / r.ok as f64),
        cpu_s,
        load: r,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One row of the same target and rate over the repetitions: each column its median.
fn median_row(rows: &[&Row]) -> Option<Row> {
    let first = (*rows.first()?).clone();
    let m = |f: &dyn Fn(&Row) -> f64| median(rows.iter().map(|r| f(r)).collect());
    let opt = |f: &dyn Fn(&Row) -> Option<f64>| {
        let v: Vec<f64> = rows.iter().filter_map(|r| f(r)).collect();
        (!v.is_empty()).then(|| median(v))
    };
    Some(Row {
        load: LoadResult {
            target: first.load.target.clone(),
            rate: first.load.rate,
            achieved: m(&|r| r.load.achieved),
            ok: m(&|r| r.load.ok as f64) as u64,
            errors: m(&|r| r.load.errors as f64) as u64,
            shed: m(&|r| r.load.shed as f64) as u64,
            p50_ms: m(&|r| r.load.p50_ms),
            p99_ms: m(&|r| r.load.p99_ms),
            max_ms: m(&|r| r.load.max_ms),
        },
        added_p50_ms: opt(&|r| r.added_p50_ms),
        added_p99_ms: opt(&|r| r.added_p99_ms),
        overhead_p50_ms: opt(&|r| r.overhead_p50_ms),
        overhead_p99_ms: opt(&|r| r.overhead_p99_ms),
        cpu_s: opt(&|r| r.cpu_s),
        cpu_us_per_req: opt(&|r| r.cpu_us_per_req),
    })
}

pub async fn run(o: Options, mut progress: impl FnMut(&str)) -> Result<Report, BenchError> {
    if o.tandem.is_empty() {
        return Err(BenchError::Setup("no tandem executable to bench".into()));
    }
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(4096)
        .build()
        .map_err(|e| BenchError::Setup(format!("HTTP client: {e}")))?;
    let mock = start_mock().await?;
    let mut targets = Vec::new();
    for (i, (label, bin)) in o.tandem.iter().enumerate() {
        let (proc, base) = start_tandem(&o, (i, bin), &mock, &client).await?;
        targets.push(Target {
            label: label.clone(),
            proc,
            url: format!("{base}/v1/chat/completions"),
            base,
            tandem: true,
        });
    }
    let litellm = match &o.litellm {
        Some(dir) => {
            let (proc, base) = start_litellm(dir, &o, &mock, &client).await?;
            Some(Target {
                label: "litellm".into(),
                proc,
                url: format!("{base}/chat/completions"),
                base,
                tandem: false,
            })
        }
        None => None,
    };
    let body = bytes::Bytes::from_static(BODY.as_bytes());
    let duration = Duration::from_secs_f64(o.seconds);
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
    // Warm the connection pools and the gateways before measuring.
    for url in std::iter::once(&mock_url).chain(targets.iter().map(|t| &t.url)) {
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
    let repeat = o.repeat.max(1);
    let mut runs: Vec<Vec<Row>> = Vec::new();
    for rep in 0..repeat {
        let mut rows = Vec::new();
        for &(rate, with_litellm) in &rates {
            let max_in_flight = ((rate * 0.5) as usize).clamp(256, 8192);
            let of = match repeat {
                1 => String::new(),
                _ => format!(" (run {} of {repeat})", rep + 1),
            };
            progress(&format!("mock alone at {rate} req/s{of}"));
            let own0 = cpu_seconds(std::process::id());
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
            let own_cpu = own0
                .zip(cpu_seconds(std::process::id()))
                .map(|(a, b)| b - a);
            let mut measured = Vec::new();
            // Rotated at each repetition: none is always the first after the mock.
            for k in 0..targets.len() {
                let t = &targets[(k + rep) % targets.len()];
                progress(&format!("{} at {rate} req/s{of}", t.label));
                measured.push(measure(&client, t, &body, rate, duration, &direct).await);
            }
            // The table lists the gateways in the order given, whatever order they ran in.
            measured.sort_by_key(|r| {
                targets
                    .iter()
                    .position(|t| t.label == r.load.target)
                    .unwrap_or(usize::MAX)
            });
            if let (true, Some(t)) = (with_litellm, &litellm) {
                progress(&format!("LiteLLM at {rate} req/s{of}"));
                measured.push(measure(&client, t, &body, rate, duration, &direct).await);
            }
            rows.push(Row {
                added_p50_ms: None,
                added_p99_ms: None,
                overhead_p50_ms: None,
                overhead_p99_ms: None,
                cpu_us_per_req: own_cpu
                    .filter(|_| direct.ok > 0)
                    .map(|c| c * 1e6 / direct.ok as f64),
                cpu_s: own_cpu,
                load: direct,
            });
            rows.extend(measured);
        }
        runs.push(rows);
    }
    let rows = match runs.len() {
        1 => runs.pop().unwrap_or_default(),
        _ => (0..runs[0].len())
            .filter_map(|i| median_row(&runs.iter().filter_map(|r| r.get(i)).collect::<Vec<_>>()))
            .collect(),
    };
    Ok(Report {
        seconds: o.seconds,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        gateway_threads: o.gateway_threads,
        log: o.log,
        repeat,
        rows,
        runs,
        litellm: o.litellm.map(|d| d.display().to_string()),
    })
}

/// The report as a table.
pub fn table(r: &Report) -> String {
    let threads = r
        .gateway_threads
        .map_or("one per core".to_string(), |n| n.to_string());
    let mut s = format!(
        "gateway overhead, open-loop load for {} s per row on {} cores (mock, load generator and gateways share them; tandem's worker threads: {threads}; RUST_LOG={})",
        r.seconds, r.cores, r.log
    );
    if r.repeat > 1 {
        s.push_str(&format!(
            "; each column the median of {} runs, the gateways taking turns",
            r.repeat
        ));
    }
    s.push('\n');
    let w = r
        .rows
        .iter()
        .map(|x| x.load.target.len())
        .max()
        .unwrap_or(0)
        .max(11);
    s.push_str(&format!(
        "{:<w$} {:>8} {:>9} {:>7} {:>6} {:>9} {:>9} {:>10} {:>10} {:>12} {:>12} {:>7} {:>10}\n",
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
        "own p99 ms",
        "cpu s",
        "cpu us/req"
    ));
    let f = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |x| format!("{x:.d$}"));
    for row in &r.rows {
        let l = &row.load;
        s.push_str(&format!(
            "{:<w$} {:>8.0} {:>9.0} {:>7} {:>6} {:>9.3} {:>9.3} {:>10} {:>10} {:>12} {:>12} {:>7} {:>10}\n",
            l.target,
            l.rate,
            l.achieved,
            l.errors,
            l.shed,
            l.p50_ms,
            l.p99_ms,
            f(row.added_p50_ms, 3),
            f(row.added_p99_ms, 3),
            f(row.overhead_p50_ms, 3),
            f(row.overhead_p99_ms, 3),
            f(row.cpu_s, 2),
            f(row.cpu_us_per_req, 1)
        ));
    }
    s.push_str("+p50/+p99: latency less the mock's alone at the same rate, same run; own: tandem's histogram of request time less upstream time (bucket upper bounds); cpu: the gateway process's CPU time over the row, and per request served (mock alone: the load generator and mock's, one process).\n");
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

    #[test]
    fn medians_over_repetitions() {
        let row = |p99: f64, cpu: Option<f64>| Row {
            load: LoadResult {
                target: "t".into(),
                rate: 100.0,
                achieved: p99 * 10.0,
                ok: 10,
                errors: 0,
                shed: 0,
                p50_ms: 1.0,
                p99_ms: p99,
                max_ms: p99,
            },
            added_p50_ms: None,
            added_p99_ms: Some(p99),
            overhead_p50_ms: None,
            overhead_p99_ms: None,
            cpu_s: cpu,
            cpu_us_per_req: None,
        };
        let rows = [row(3.0, Some(1.0)), row(1.0, None), row(2.0, Some(2.0))];
        let m = median_row(&rows.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(m.load.p99_ms, 2.0);
        assert_eq!(m.load.achieved, 20.0);
        assert_eq!(m.added_p99_ms, Some(2.0));
        assert_eq!(m.cpu_s, Some(1.5));
        assert_eq!(m.cpu_us_per_req, None);
        assert!(median_row(&[]).is_none());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn own_cpu_time_is_read() {
        let c = cpu_seconds(std::process::id()).unwrap();
        assert!(c >= 0.0);
        assert!(cpu_seconds(u32::MAX).is_none());
    }
}
