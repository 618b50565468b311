use anyhow::{bail, Context, Result};
use clap::Args;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tandem_models::assets::{find, Store};
use tandem_run::config::{RunConfig, TierKind};
use tandem_run::live::{self, Progress, RunOptions};
use tandem_run::plot::write_plot;
use tandem_run::report::RunReport;
use tandem_run::{stream, tiers};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The cascade, in TOML (see examples/demo.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// A JSONL file ({"id"?, "text", "label"?} a line), `-` for standard input, or a built-in dataset (`snippets`, `amazon`).
    #[arg(long, default_value = "snippets")]
    pub input: String,
    /// Validate the configuration (and that its assets are installed), then exit.
    #[arg(long)]
    pub check: bool,
    /// Process only the first N items.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Shuffles built-in datasets.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write one JSON answer per input here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep learned state here (checkpoints), so the run can resume.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Continue the run saved in --state: no item is lost or answered twice.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Plot per-tier share and rolling accuracy over the stream as NAME.svg and NAME.png (give
    /// either, or NAME).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Threads for the model tiers (default: all cores).
    #[arg(long, value_parser = crate::at_least_one())]
    pub threads: Option<usize>,
    /// Warm start: teach the cheap tiers these labelled items before the stream starts (DS+'s
    /// small model trained on labelled data): `rest` (the input's items past --limit, a held-out
    /// split of the same shuffle), or a JSONL file of {"text", "label"}. Items without a label
    /// are skipped and counted.
    #[arg(long)]
    pub pretrain: Option<String>,
    /// At most this many pretraining items.
    #[arg(long)]
    pub pretrain_limit: Option<usize>,
}

pub fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        // candle's CPU kernels size their thread pool from this on first use.
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
}

fn digest(config_text: &str, a: &RunArgs) -> String {
    let mut h = Sha256::new();
    h.update(config_text.as_bytes());
    // The limit is left out: a resumed run may go further than the first one.
    h.update(format!("\n{}\n{}", a.input, a.seed).as_bytes());
    if let Some(p) = &a.pretrain {
        h.update(format!("\npretrain {p} {:?}", a.pretrain_limit).as_bytes());
        // `rest` learns the items past --limit: a resume going further would answer them.
        if p == "rest" {
            h.update(format!(" limit {:?}", a.limit).as_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks that every asset the cascade uses is installed (no hashing of big files twice: the
/// tiers verify when they load).
fn check_assets(cfg: &RunConfig, store: &Store) -> Result<()> {
    for t in &cfg.tiers {
        let id = match t.kind {
            TierKind::Minilm | TierKind::Knn => Some("minilm"),
            TierKind::Gguf => t.asset.as_deref(),
            TierKind::Hashed => None,
        };
        if let Some(id) = id {
            let asset = find(id)?;
            if !store.is_installed(asset) {
                anyhow::bail!("tier `{}` needs asset `{id}`, which is not installed: run `tandem assets install {id}`", t.name);
            }
        }
    }
    Ok(())
}

pub fn run_with(a: &RunArgs, cfg: RunConfig, config_text: &str) -> Result<RunReport> {
    // A plot name that cannot be written fails now, not after the stream.
    if let Some(p) = &a.plot {
        tandem_eval::plot::svg_and_png(p)?;
    }
    set_threads(a.threads);
    let store = Store::default_home();
    check_assets(&cfg, &store)?;
    let mut s = stream::open(&a.input, &cfg, a.seed, &store)?;
    let mut rest = Vec::new();
    if let Some(l) = a.limit {
        if l < s.items.len() {
            rest = s.items.split_off(l);
        }
    }
    let mut tiers = tiers::build(&cfg, &store)?;
    if a.pretrain_limit.is_some() && a.pretrain.is_none() {
        bail!("--pretrain-limit applies to --pretrain");
    }
    if a.resume && a.pretrain.is_some() {
        println!(
            "--resume: the checkpoint holds what the pretraining taught; not pretraining again"
        );
    }
    // A resumed run's checkpoint holds what the pretraining taught.
    if let Some(src) = a.pretrain.as_ref().filter(|_| !a.resume) {
        let items = match src.as_str() {
            "rest" if rest.is_empty() => {
                bail!(
                    "--pretrain rest: the input has {} items, none past --limit to learn from (lower the limit; tandem demo: or --pretrain 0)",
                    s.items.len()
                )
            }
            "rest" => std::mem::take(&mut rest),
            path => stream::open(path, &cfg, a.seed, &store)?.items,
        };
        let n = a.pretrain_limit.unwrap_or(usize::MAX).min(items.len());
        let cheap: Vec<&str> = cfg.tiers[..cfg.tiers.len().saturating_sub(1)]
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        let bar = crate::progress::Progress::new(
            &format!(
                "labelled items learned by {} (--pretrain)",
                cheap.join(", ")
            ),
            n as u64,
        );
        let t0 = std::time::Instant::now();
        let done = tandem_run::live::pretrain(&mut tiers, &items[..n], &mut |k| bar.set(k as u64))?;
        bar.finish();
        println!(
            "pretrained the cheap tiers on {} labelled items in {:.0} s ({} without a label skipped)",
            done.learned,
            t0.elapsed().as_secs_f64(),
            done.unlabelled
        );
    }
    let limits = cfg.budget.limits().map_err(anyhow::Error::msg)?;
    let opts = RunOptions {
        output: a.out.clone(),
        state_dir: a.state.clone(),
        resume: a.resume,
        checkpoint_every: a.checkpoint_every.max(1),
        lookahead: 64,
        teach_gold: cfg.policy.teach == tandem_run::config::Teach::Gold,
    };
    let bar = crate::progress::Progress::new("items", s.items.len() as u64);
    let names: Vec<String> = cfg.tiers.iter().map(|t| t.name.clone()).collect();
    let mut last_msg = std::time::Instant::now();
    let mut show = |p: &Progress| {
        // A log line (stderr not a terminal) prints at `set`: the message first, so it is current.
        if last_msg.elapsed().as_millis() >= 250 || p.done == p.total || !bar.is_bar() {
            last_msg = std::time::Instant::now();
            let n = p.done.max(1) as f64;
            let shares: Vec<String> = p
                .state
                .tiers
                .iter()
                .zip(&names)
                .map(|(t, name)| format!("{name} {:.0}%", 100.0 * t.answered as f64 / n))
                .collect();
            let agree: Vec<String> = p.state.tiers[..p.state.tiers.len() - 1]
                .iter()
                .filter(|t| t.with_top > 0)
                .map(|t| format!("{:.0}%", 100.0 * t.agree_top as f64 / t.with_top as f64))
                .collect();
            let acc = if p.state.with_gold > 0 {
                format!(
                    "acc {:.1}%",
                    100.0 * p.state.correct as f64 / p.state.with_gold as f64
                )
            } else {
                String::new()
            };
            bar.set_message(format!(
                "| {} | agree w/ top {} | {acc}",
                shares.join(" "),
                agree.join("/")
            ));
        }
        bar.set(p.done);
    };
    let mut cascade = live::cascade_for(&cfg, &tiers, a.seed)?;
    let state = live::run(
        &s,
        &cfg.labels,
        &mut tiers,
        &mut cascade,
        limits,
        &digest(config_text, a),
        &opts,
        &mut show,
    )?;
    bar.finish();
    let report = RunReport::new(&state, s.truncated);
    if let Some(p) = &a.json {
        write_json(p, &report)?;
    }
    if let Some(given) = &a.plot {
        let (svg, png) = tandem_eval::plot::svg_and_png(given)?;
        write_plot(&state, &svg, 200)?;
        write_plot(&state, &png, 200)?;
    }
    Ok(report)
}

pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(a: RunArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("cannot read {}", a.config.display()))?;
    let cfg = RunConfig::parse(&a.config, &text)?;
    if a.check {
        check_assets(&cfg, &Store::default_home())?;
        println!(
            "{}: valid ({} tiers, {} labels)",
            a.config.display(),
            cfg.tiers.len(),
            cfg.labels.len()
        );
        return Ok(());
    }
    let report = run_with(&a, cfg, &text)?;
    print!("{}", report.table());
    Ok(())
}
