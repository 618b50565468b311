//! `tandem bench londi`: LONDI's switching controller on TextWorld games (see tandem_agent::bench).

use crate::assets_cmd::ensure_installed;
use crate::run_cmd::write_json;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use tandem_agent::actor::LlmActor;
use tandem_agent::bench::{plot_frontier, Bench, BenchConfig};
use tandem_agent::env::TextWorld;
use tandem_models::assets::Store;
use tandem_models::gguf::GgufLm;

#[derive(Args, Debug)]
pub struct LondiArgs {
    /// The tiny version run in CI: 2 training and 2 held-out small games, SmolLM2-135M as the
    /// large policy, one seed.
    #[arg(long)]
    quick: bool,
    /// The large policy's model: an installed asset id.
    #[arg(long)]
    large: Option<String>,
    /// Seeds of the runs (controller initialisation, exploration, game order).
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    /// Switching costs c of the LONDI rows.
    #[arg(long, value_delimiter = ',')]
    costs: Option<Vec<f32>>,
    /// Per-episode budgets of the LONDI-B rows.
    #[arg(long, value_delimiter = ',')]
    budgets: Option<Vec<u32>>,
    /// Training episodes per method and seed.
    #[arg(long)]
    train_episodes: Option<u32>,
    /// Run only the policies whose names start with one of these (e.g. always-large,LONDI).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Game generator settings (defaults: see `BenchConfig::full` / `quick`).
    #[arg(long)]
    rooms: Option<u32>,
    #[arg(long)]
    objects: Option<u32>,
    #[arg(long)]
    quest_length: Option<u32>,
    #[arg(long)]
    max_steps: Option<u32>,
    /// Numbers of training and held-out games (seeds 1.. and 1001..).
    #[arg(long)]
    train_games: Option<u64>,
    #[arg(long)]
    test_games: Option<u64>,
    /// Replay recorded large-model scores only; fail on a state that was never recorded.
    #[arg(long)]
    replay_only: bool,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where games, recordings and the plot go.
    #[arg(long, default_value = "out/bench-londi")]
    out: PathBuf,
    /// Log every held-out episode's actions (s: small, l: large).
    #[arg(long)]
    trace: bool,
    /// CPU threads for the model.
    #[arg(long)]
    threads: Option<usize>,
}

fn model_of(id: &str) -> Result<&'static str> {
    Ok(match id {
        "smollm2-135m" => "SmolLM2-135M-Instruct.Q4_1.gguf",
        "qwen2.5-coder-0.5b" => "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        other => bail!("--large {other}: not a GGUF asset (smollm2-135m or qwen2.5-coder-0.5b)"),
    })
}

pub fn run(a: LondiArgs) -> Result<()> {
    crate::run_cmd::set_threads(a.threads);
    let store = Store::default_home();
    let large_id = a.large.clone().unwrap_or_else(|| {
        if a.quick {
            "smollm2-135m".into()
        } else {
            "qwen2.5-coder-0.5b".into()
        }
    });
    let file = model_of(&large_id)?;
    let games_dir = a.out.join("games");
    let mut cfg = if a.quick {
        BenchConfig::quick(games_dir)
    } else {
        BenchConfig::full(games_dir)
    };
    if let Some(s) = a.seeds {
        cfg.run_seeds = s;
    }
    if let Some(c) = a.costs {
        if c.iter().any(|c| !(c.is_finite() && *c >= 0.0)) {
            bail!("--costs {c:?}: each must be zero or positive");
        }
        cfg.costs = c;
    }
    if let Some(b) = a.budgets {
        cfg.budgets = b;
    }
    if let Some(e) = a.train_episodes {
        cfg.train_episodes = e;
    }
    cfg.trace = a.trace;
    cfg.only = a.only;
    cfg.rooms = a.rooms.unwrap_or(cfg.rooms);
    cfg.objects = a.objects.unwrap_or(cfg.objects);
    cfg.quest_length = a.quest_length.unwrap_or(cfg.quest_length);
    cfg.max_steps = a.max_steps.unwrap_or(cfg.max_steps);
    if let Some(n) = a.train_games {
        cfg.train_seeds = (1..=n).collect();
    }
    if let Some(n) = a.test_games {
        cfg.test_seeds = (1001..1001 + n).collect();
    }
    if cfg.rooms == 0 || cfg.quest_length == 0 || cfg.max_steps == 0 || cfg.test_seeds.is_empty() {
        bail!("--rooms, --quest-length, --max-steps and --test-games must be positive");
    }
    if cfg.run_seeds.is_empty() {
        bail!("--seeds: at least one");
    }
    let model = if a.replay_only {
        None
    } else {
        ensure_installed(&store, &[&large_id])?;
        let path = store.path(&large_id, &format!("{large_id}/{file}"))?;
        Some(GgufLm::load(&path).with_context(|| format!("loading {}", path.display()))?)
    };
    let recording = a.out.join(format!("recorded-{large_id}.jsonl"));
    let mut large = LlmActor::new(model, &large_id, Some(&recording))?;
    let site = store.home().join("py/textworld");
    let mut env = TextWorld::start(&site, Path::new("python3"))
        .context("starting TextWorld (scripts/setup-textworld installs it)")?;
    let mut log = |l: &str| eprintln!("tandem: {l}");
    let report = Bench {
        cfg,
        env: &mut env,
        large: &mut large,
        large_name: large_id.clone(),
        log: &mut log,
    }
    .run()?;
    println!(
        "LONDI on held-out TextWorld games ({}; large = {}, {} training episodes, seeds {:?})",
        report.games, report.large_model, report.train_episodes, report.run_seeds
    );
    println!(
        "{:<24} {:>14} {:>7} {:>12} {:>14} {:>10}",
        "policy", "success", "score", "large share", "large/episode", "max large"
    );
    for r in &report.rows {
        println!(
            "{:<24} {:>7.1}% ±{:>4.1} {:>7.2} {:>11.1}% {:>14.2} {:>10}",
            r.name,
            r.success * 100.0,
            r.success_sd * 100.0,
            r.score,
            r.large_share * 100.0,
            r.large_calls_per_episode,
            r.max_large_calls
        );
    }
    let c = report.large_cost;
    println!(
        "large policy: {} steps asked, {} replayed from {}, {:.1} s of model compute",
        c.calls,
        c.replayed,
        recording.display(),
        c.seconds
    );
    let plot = a.out.join("londi-frontier.svg");
    plot_frontier(
        &report.rows,
        &format!("LONDI on held-out TextWorld games (large = {large_id})"),
        &plot,
    )?;
    println!("plot: {}", plot.display());
    if let Some(p) = &a.json {
        write_json(p, &report)?;
    }
    Ok(())
}
