//! `tandem bench cascade`: the policies side by side on live cascades (see tandem_run::bench).

use crate::assets_cmd::ensure_installed;
use crate::demo_cmd::cache_recordings;
use crate::progress::Progress;
use crate::run_cmd::{set_threads, write_json};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::path::{Path, PathBuf};
use tandem_models::assets::Store;
use tandem_run::bench::{self, plot, summary, Dataset, Plan, Stage};
use tandem_run::config::TierKind;
use tandem_run::{stream, RunConfig};

const DEMO: &str = include_str!("../../../examples/demo.toml");
const AMAZON: &str = include_str!("../../../examples/amazon.toml");
const QUICK: &str = include_str!("../../../examples/bench-quick.toml");

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Every cascade policy (OCL, DS+ shunt with S4L/L4S, E-LANG, random deferral, each tier
    /// alone) on the movie-review and product-review streams, over several stream orders.
    Cascade(CascadeArgs),
    /// The gateway's own overhead under open-loop load against an instant mock upstream, with
    /// LiteLLM's proxy side by side when installed (scripts/setup-litellm).
    Gateway(GatewayArgs),
    /// The gateway against failing upstreams (mock endpoints on loopback, no key): two per
    /// model, one failing 30% of its calls (5xx, 429, resets, hangs, garbage, cut bodies), then
    /// both failing 10%; requests served, lost and failed, and spend billed against counted.
    Faults(FaultsArgs),
    /// LONDI's switching controller against always-small, always-large, random switching and a
    /// confidence threshold, on held-out episodes of TextWorld games, BabyAI-Text levels or
    /// ScienceWorld tasks (--env; scripts/setup-textworld, -babyai, -scienceworld install them).
    Londi(crate::londi_cmd::LondiArgs),
}

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// Request rates (per second) for the mock alone and tandem.
    #[arg(long, value_delimiter = ',', default_values_t = [1000.0, 5000.0, 10000.0])]
    rates: Vec<f64>,
    /// Rates at which LiteLLM is compared too (it saturates at a few hundred per second).
    #[arg(long, value_delimiter = ',', default_values_t = [50.0, 100.0, 200.0])]
    compare_rates: Vec<f64>,
    /// Seconds of load per row.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Leave LiteLLM out even if installed.
    #[arg(long)]
    no_litellm: bool,
    #[arg(long)]
    json: Option<PathBuf>,
    /// The `tandem` executable to run as the gateway (default: this one), e.g. an older build to
    /// compare with the same load generator; `LABEL=PATH` names its rows. Give it several times
    /// to bench several builds in one run (they take turns at each rate).
    #[arg(long)]
    tandem: Vec<String>,
    /// Run every row this many times and report each column's median (the gateways' order
    /// rotated at each run).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// `RUST_LOG` for the gateways: `warn` leaves the request log out, `info` writes a line per
    /// request (as `tandem serve` does by default).
    #[arg(long, default_value = "warn")]
    log: String,
    /// Worker threads of each tandem gateway (TOKIO_WORKER_THREADS); default: one per core, as
    /// `tandem serve` runs. On a small machine `--gateway-threads 1` leaves the load generator
    /// and mock a core of their own (and matches LiteLLM's single worker).
    #[arg(long, value_parser = crate::at_least_one())]
    gateway_threads: Option<usize>,
    /// Where configs and the servers' logs go.
    #[arg(long, default_value = "out/bench-gateway")]
    out: PathBuf,
}

#[derive(Args, Debug)]
pub struct CascadeArgs {
    /// The built-in streams to run (snippets: movie reviews; amazon: product reviews).
    #[arg(long = "dataset", default_values_t = ["snippets".to_string(), "amazon".to_string()])]
    datasets: Vec<String>,
    /// Bench your own cascade instead: a config (with --input).
    #[arg(long, requires = "input")]
    config: Option<PathBuf>,
    /// With --config: a JSONL file with gold labels, or a built-in dataset.
    #[arg(long)]
    input: Option<String>,
    /// The small version run in CI: 1,000 snippets, SmolLM2-135M on top, a shorter sweep.
    #[arg(long)]
    quick: bool,
    /// Use only the first N items of each stream (the same items in every order).
    #[arg(long)]
    limit: Option<usize>,
    /// Labelled items held out of each stream that the cheap tiers learn before every run: the
    /// items after --limit, or without it the stream's last N (which then leave the stream).
    #[arg(long, default_value_t = 0)]
    pretrain: usize,
    /// Who teaches the cheap tiers in every policy: the top tier's answers, or each item's gold
    /// label (default: the configuration's `[policy] teach`).
    #[arg(long, value_enum)]
    teach: Option<TeachArg>,
    /// Stream orders (seeds), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [0u64, 1, 2])]
    seeds: Vec<u64>,
    /// The top-tier share of the table's rows.
    #[arg(long, default_value_t = 0.3)]
    operating: f64,
    /// Leave out the soft-S4L rows (they call the top model with hinted prompts: slow unrecorded).
    #[arg(long)]
    no_s4l: bool,
    /// Run the soft-S4L rows over this many of the stream orders (the first ones).
    #[arg(long, default_value_t = 1)]
    s4l_orders: usize,
    /// Parallel runs.
    #[arg(long, value_parser = crate::at_least_one(), default_value_t = 2)]
    threads: usize,
    /// Write every dataset's summary (rows, equal-share comparisons, frontiers) as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where the frontier plots go.
    #[arg(long, default_value = "out/bench")]
    out: PathBuf,
}

#[derive(Args, Debug)]
pub struct FaultsArgs {
    /// Requests per scenario.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Requests per second (open loop).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// The degraded upstream's fault rate in the first scenario.
    #[arg(long, default_value_t = 0.3)]
    fault_rate: f64,
    /// Both upstreams' fault rate in the second scenario.
    #[arg(long, default_value_t = 0.1)]
    both_rate: f64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct BenchJson {
    datasets: Vec<summary::DatasetSummary>,
    runs: Vec<bench::RunResult>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.command {
        BenchCommand::Cascade(c) => cascade(c),
        BenchCommand::Gateway(g) => gateway(g),
        BenchCommand::Faults(f) => faults(f),
        BenchCommand::Londi(l) => crate::londi_cmd::run(l),
    }
}

fn gateway(a: GatewayArgs) -> Result<()> {
    for r in a.rates.iter().chain(&a.compare_rates) {
        if !(r.is_finite() && *r > 0.0) {
            bail!("rate {r}: must be a positive number of requests per second");
        }
    }
    if !(a.seconds.is_finite() && a.seconds > 0.0) {
        bail!("--seconds {}: must be positive", a.seconds);
    }
    if a.repeat == 0 {
        bail!("--repeat 0: must be at least 1");
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let litellm = Store::default_home().home().join("py/litellm");
    let litellm = if a.no_litellm {
        None
    } else if litellm.join("litellm").is_dir() {
        Some(litellm)
    } else {
        eprintln!(
            "LiteLLM is not installed in {} (scripts/setup-litellm): benchmarking tandem alone",
            litellm.display()
        );
        None
    };
    let opts = tandem_server::bench::Options {
        rates: a.rates,
        compare_rates: a.compare_rates,
        seconds: a.seconds,
        tandem: gateways(&a.tandem)?,
        repeat: a.repeat,
        log: a.log,
        gateway_threads: a.gateway_threads.filter(|&n| n > 0),
        litellm,
        work_dir: a.out.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = rt.block_on(tandem_server::bench::run(opts, |m| {
        eprintln!("bench gateway: {m}")
    }))?;
    print!("{}", tandem_server::bench::table(&report));
    if let Some(p) = &a.json {
        write_json(p, &report)?;
    }
    Ok(())
}

/// The gateways to bench, labelled: `--tandem [LABEL=]PATH` each, or this executable. One
/// unlabelled is `tandem`; several unlabelled take their file names.
fn gateways(given: &[String]) -> Result<Vec<(String, PathBuf)>> {
    if given.is_empty() {
        let exe = std::env::current_exe().context("finding the tandem executable")?;
        return Ok(vec![("tandem".into(), exe)]);
    }
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for g in given {
        let (label, path) = match g.split_once('=') {
            Some((l, p)) if !l.is_empty() && !l.contains(['/', '\\']) => (l.to_string(), p),
            _ if given.len() == 1 => ("tandem".to_string(), g.as_str()),
            _ => {
                let name = Path::new(g)
                    .file_name()
                    .map_or_else(|| g.clone(), |n| n.to_string_lossy().into_owned());
                (name, g.as_str())
            }
        };
        if out.iter().any(|(l, _)| *l == label) {
            bail!("--tandem {g}: the label `{label}` is taken; name each as LABEL=PATH");
        }
        out.push((label, PathBuf::from(path)));
    }
    Ok(out)
}

fn faults(a: FaultsArgs) -> Result<()> {
    if !(a.rate.is_finite() && a.rate > 0.0) {
        bail!(
            "--rate {}: must be a positive number of requests per second",
            a.rate
        );
    }
    for (flag, r) in [("--fault-rate", a.fault_rate), ("--both-rate", a.both_rate)] {
        if !(0.0..=1.0).contains(&r) {
            bail!("{flag} {r}: must be a share between 0 and 1");
        }
    }
    if a.requests == 0 {
        bail!("--requests 0: must be at least 1");
    }
    let opts = tandem_server::bench::faults::FaultOptions {
        requests: a.requests,
        rate: a.rate,
        fault_rate: a.fault_rate,
        both_rate: a.both_rate,
        seed: a.seed,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = rt.block_on(tandem_server::bench::faults::run(opts, |m| {
        eprintln!("bench faults: {m}")
    }))?;
    print!("{}", tandem_server::bench::faults::table(&report));
    if let Some(p) = &a.json {
        write_json(p, &report)?;
    }
    Ok(())
}

fn plan(a: &CascadeArgs) -> Result<Plan> {
    if !(a.operating > 0.0 && a.operating < 1.0) {
        bail!("--operating {}: must be between 0 and 1", a.operating);
    }
    if a.seeds.is_empty() {
        bail!("--seeds: give at least one");
    }
    let mut compare_at = vec![0.2, 0.3, 0.5];
    let mut shares = vec![0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8];
    let mut thresholds = vec![0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.96, 0.98, 0.995];
    if a.quick {
        shares = vec![0.2, 0.3, 0.5, 0.7];
        thresholds = vec![0.7, 0.85, 0.93, 0.98];
        compare_at = vec![0.3, 0.5];
    }
    for s in [a.operating] {
        if !shares.iter().any(|x| (x - s).abs() < 1e-9) {
            shares.push(s);
        }
    }
    shares.sort_by(f64::total_cmp);
    Ok(Plan {
        seeds: a.seeds.clone(),
        shares,
        thresholds,
        operating: a.operating,
        compare_at,
        s4l: !a.no_s4l && !a.quick,
        s4l_seeds: a.s4l_orders,
        threads: a.threads.max(1),
        shuffle: true,
    })
}

fn datasets(a: &CascadeArgs, store: &Store) -> Result<Vec<Dataset>> {
    let specs: Vec<(String, String, String, PathBuf)> = if let Some(c) = &a.config {
        let text =
            std::fs::read_to_string(c).with_context(|| format!("cannot read {}", c.display()))?;
        let input = a.input.clone().unwrap_or_default();
        let name = Path::new(&input)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("custom")
            .to_string();
        vec![(name, input, text, c.clone())]
    } else if a.quick {
        vec![(
            "snippets-quick".into(),
            "snippets".into(),
            QUICK.into(),
            "examples/bench-quick.toml".into(),
        )]
    } else {
        a.datasets
            .iter()
            .map(|d| match d.as_str() {
                "snippets" => Ok((d.clone(), d.clone(), DEMO.to_string(), "examples/demo.toml".into())),
                "amazon" => Ok((d.clone(), d.clone(), AMAZON.to_string(), "examples/amazon.toml".into())),
                other => bail!("--dataset {other:?}: not a built-in stream (snippets, amazon); bench another with --config and --input"),
            })
            .collect::<Result<_>>()?
    };
    let limit = a.limit.or(a.quick.then_some(1000));
    let mut out = Vec::new();
    for (name, input, text, path) in specs {
        let mut cfg = RunConfig::parse(&path, &text)?;
        if a.config.is_none() {
            cache_recordings(&mut cfg, store);
            let mut ids: Vec<&str> = vec![input.as_str()];
            for t in &cfg.tiers {
                match t.kind {
                    TierKind::Minilm | TierKind::Knn => ids.push("minilm"),
                    TierKind::Gguf => ids.extend(t.asset.as_deref()),
                    TierKind::Hashed => {}
                }
            }
            ensure_installed(store, &ids)?;
        }
        let mut s = stream::open(&input, &cfg, 0, store)?;
        if s.items.iter().all(|i| i.gold.is_none()) {
            bail!("{input}: no gold labels; the benchmark measures accuracy against them");
        }
        let pretrain = held_out(&mut s.items, limit, a.pretrain, &input)?;
        if let Some(t) = a.teach {
            cfg.policy.teach = t.into();
        }
        out.push(Dataset {
            name,
            cfg,
            stream: s,
            pretrain,
        });
    }
    Ok(out)
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum TeachArg {
    Top,
    Gold,
}

impl From<TeachArg> for tandem_run::config::Teach {
    fn from(t: TeachArg) -> Self {
        match t {
            TeachArg::Top => Self::Top,
            TeachArg::Gold => Self::Gold,
        }
    }
}

/// Every policy of `plan` over `ds`, with progress: embedding its texts and recording the top
/// tier's missing answers first (cached), then the runs.
pub(crate) fn sweep(
    ds: &Dataset,
    plan: &Plan,
    store: &Store,
) -> Result<(Vec<bench::RunResult>, summary::DatasetSummary)> {
    let embed = bar(0, &format!("{}: embedding", ds.name));
    let top = ds.cfg.tiers.last().map_or("top", |t| t.name.as_str());
    let record = bar(0, &format!("{}: answers of the top tier ({top})", ds.name));
    let prep = bench::prepare(ds, store, &mut |stage, done, n| {
        let b = match stage {
            Stage::Embedding => &embed,
            Stage::Recording => &record,
        };
        b.set_total(n as u64);
        b.set(done as u64);
    })?;
    embed.finish();
    record.finish();
    let n_runs = bench::jobs(&bench::variants(&ds.cfg, plan), plan).len();
    let runs_bar = bar(n_runs as u64, &format!("{}: cascade runs", ds.name));
    let runs = bench::run_all(ds, &prep, plan, store, &|k, _| runs_bar.set(k as u64))?;
    runs_bar.finish();
    let names: Vec<String> = ds.cfg.tiers.iter().map(|t| t.name.clone()).collect();
    let s = summary::summarize(&ds.name, ds.stream.items.len(), &names, &runs, plan);
    Ok((runs, s))
}

/// Splits `n` labelled items off the stream for pretraining: the items after the first `limit`
/// (the rest of the same shuffle, as `tandem run --pretrain rest` takes them), or without a limit
/// the last `n`; then keeps the first `limit` as the stream.
pub(crate) fn held_out(
    items: &mut Vec<tandem_run::stream::Item>,
    limit: Option<usize>,
    n: usize,
    input: &str,
) -> Result<Vec<tandem_run::stream::Item>> {
    let keep = limit
        .unwrap_or(items.len().saturating_sub(n))
        .min(items.len());
    if n > 0 && items.len() < keep + n {
        bail!(
            "--pretrain {n}: {input} has {} items, not enough for {keep} in the stream and {n} held out to pretrain on",
            items.len()
        );
    }
    if n > 0 && keep == 0 {
        bail!("--pretrain {n}: would leave no items in the stream of {input}");
    }
    let mut rest = items.split_off(keep);
    rest.truncate(n);
    if rest.iter().any(|i| i.gold.is_none()) {
        bail!("--pretrain {n}: some of the held-out items of {input} have no gold label");
    }
    Ok(rest)
}

fn bar(len: u64, what: &str) -> Progress {
    Progress::new(what, len)
}

fn cascade(a: CascadeArgs) -> Result<()> {
    let plan = plan(&a)?;
    let store = Store::default_home();
    set_threads(Some(2));
    let mut summaries = Vec::new();
    let mut all_runs = Vec::new();
    for ds in datasets(&a, &store)? {
        let t0 = std::time::Instant::now();
        let (runs, s) = sweep(&ds, &plan, &store)?;
        println!(
            "{}: cheap tiers taught by {}{}",
            ds.name,
            match ds.cfg.policy.teach {
                tandem_run::config::Teach::Gold => "each item's gold label",
                tandem_run::config::Teach::Top => "the top tier's answers",
            },
            if ds.pretrain.is_empty() {
                String::new()
            } else {
                format!(
                    ", after learning {} labelled items held out of the stream",
                    ds.pretrain.len()
                )
            }
        );
        print!("{}", s.table());
        let svg = a.out.join(format!("{}-frontier.svg", ds.name));
        plot::write_frontiers(&s, &svg)?;
        plot::write_frontiers(&s, &svg.with_extension("png"))?;
        println!(
            "{} runs in {:.0} s; plot: {}\n",
            runs.len(),
            t0.elapsed().as_secs_f64(),
            svg.display()
        );
        summaries.push(s);
        all_runs.extend(runs);
    }
    if let Some(p) = &a.json {
        write_json(
            p,
            &BenchJson {
                datasets: summaries,
                runs: all_runs,
            },
        )?;
    }
    Ok(())
}
