use crate::bench_cmd::{held_out, sweep};
use crate::run_cmd::{run_with, write_json, RunArgs};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use tandem_models::assets::Store;
use tandem_run::bench::{self, plot, summary, Dataset, Plan};
use tandem_run::RunConfig;

/// The cascade the demo runs (also in examples/demo.toml).
const DEMO: &str = include_str!("../../../examples/demo.toml");

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How many movie-review snippets to stream (of 10,605).
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where answers, state and the plot go.
    #[arg(long, default_value = "out/demo")]
    dir: PathBuf,
    /// Labelled snippets (held out of the stream) the cheap tiers learn before it starts; 0:
    /// none, so they learn from the stream alone.
    #[arg(long, default_value_t = 3000)]
    pretrain: usize,
    /// Stop after the live run: skip recording the LLM on the items it did not see and sweeping
    /// every policy over them (the frontier plot and the cheapest policy that matches the LLM).
    #[arg(long)]
    no_frontier: bool,
}

/// The best policy must reach the LLM alone's accuracy within this (half a point).
const MATCH_TOLERANCE: f64 = 0.005;

pub fn run(a: DemoArgs) -> Result<()> {
    let store = Store::default_home();
    crate::assets_cmd::ensure_installed(&store, &["minilm", "qwen2.5-coder-0.5b", "snippets"])?;
    let mut cfg = RunConfig::parse(std::path::Path::new("examples/demo.toml"), DEMO)?;
    cache_recordings(&mut cfg, &store);
    let cfg_for_frontier = cfg.clone();
    let args = RunArgs {
        config: PathBuf::from("examples/demo.toml"),
        input: "snippets".into(),
        check: false,
        limit: Some(a.limit),
        seed: a.seed,
        out: Some(a.dir.join("answers.jsonl")),
        state: Some(a.dir.join("state")),
        resume: false,
        checkpoint_every: 500,
        json: None,
        plot: Some(a.dir.join("run.svg")),
        threads: None,
        pretrain: (a.pretrain > 0).then(|| "rest".to_string()),
        pretrain_limit: (a.pretrain > 0).then_some(a.pretrain),
    };
    let warm = if a.pretrain > 0 {
        format!(
            "warm up on up to {} labelled snippets held out of the stream, then ",
            a.pretrain
        )
    } else {
        String::new()
    };
    println!("tandem demo: {} movie-review snippets through hashed n-grams -> MiniLM head -> Qwen2.5-0.5B (local, no API key); the cheap tiers {warm}learn each item's label after answering it; once they are past their warm-up, one threshold holds the LLM's share at 35%; the LLM's answers are replayed from {} where recorded", a.limit, store.home().join("recordings").display());
    let report = run_with(&args, cfg, DEMO)?;
    print!("{}", report.table());
    println!(
        "answers: {}; plot: {}",
        a.dir.join("answers.jsonl").display(),
        a.dir.join("run.svg").display()
    );
    if let Some(p) = &a.json {
        write_json(p, &report)?;
    }
    if !a.no_frontier {
        frontier(&a, cfg_for_frontier, &store)?;
    }
    Ok(())
}

/// Every policy over the demo's snippets, in the live run's order and with its warm-up: the LLM
/// alone, each cheap tier alone, and each deferral policy at several shares. Prints the cheapest
/// that matches the LLM and draws the frontier.
fn frontier(a: &DemoArgs, cfg: RunConfig, store: &Store) -> Result<()> {
    println!("\nthe frontier: every policy on the same {} snippets, in the same order and with the same warm-up (the LLM's answers on the items the live run did not send it are recorded first; later demos replay them)", a.limit);
    let mut s = tandem_run::stream::open("snippets", &cfg, a.seed, store)?;
    let pretrain = held_out(&mut s.items, Some(a.limit), a.pretrain, "snippets")?;
    let ds = Dataset {
        name: "snippets".into(),
        cfg,
        stream: s,
        pretrain,
    };
    let plan = Plan {
        seeds: vec![a.seed],
        shares: vec![0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8],
        thresholds: vec![0.8, 0.9, 0.95, 0.98, 0.995],
        operating: 0.35,
        compare_at: vec![0.3, 0.4],
        s4l: false,
        s4l_seeds: 0,
        threads: 2,
        shuffle: false,
    };
    let (runs, summary) = sweep(&ds, &plan, store)?;
    let svg = a.dir.join("frontier.svg");
    plot::write_frontiers(&summary, &svg)?;
    plot::write_frontiers(&summary, &svg.with_extension("png"))?;
    let top = summary.top_accuracy;
    let llm = runs
        .iter()
        .find(|r| r.family == bench::ALWAYS_TOP)
        .context("the sweep has no LLM-alone run")?;
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    println!(
        "LLM alone: {} on {} snippets, {} calls, ${:.4}, {:.0} s of compute",
        pct(top),
        llm.items,
        llm.items,
        llm.cost_usd,
        llm.compute_s
    );
    match summary::cheapest_reaching(&runs, top - MATCH_TOLERANCE, summary.best_cheap_accuracy, top)
    {
        Some(best) => {
            let calls = (best.top_share * llm.items as f64).round();
            println!(
                "cheapest policy that matches it (within half a point): {}: {} with {calls:.0} LLM calls ({} share), saving {} of the calls, ${:.4} and {:.0} s of compute",
                best.name,
                pct(best.accuracy),
                pct(best.top_share),
                pct(1.0 - best.top_share),
                llm.cost_usd - best.cost_usd,
                llm.compute_s - best.compute_s
            );
        }
        None => println!(
            "no policy swept matches the LLM alone within half a point on these snippets; the frontier shows how close each comes"
        ),
    }
    println!("frontier plot: {}", svg.display());
    Ok(())
}

/// Recorded LLM answers live in the cache, so a second demo (or benchmark) replays instead of
/// recomputing; entries are keyed by model and prompt, so datasets share one file per tier.
pub fn cache_recordings(cfg: &mut RunConfig, store: &Store) {
    for t in cfg.tiers.iter_mut().filter(|t| t.recording.is_some()) {
        t.recording = Some(
            store
                .home()
                .join("recordings")
                .join(format!("demo-{}.jsonl", t.name)),
        );
    }
}
