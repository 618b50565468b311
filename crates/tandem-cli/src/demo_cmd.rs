use crate::run_cmd::{run_with, write_json, RunArgs};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use tandem_models::assets::Store;
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
}

pub fn run(a: DemoArgs) -> Result<()> {
    let store = Store::default_home();
    crate::assets_cmd::ensure_installed(&store, &["minilm", "qwen2.5-coder-0.5b", "snippets"])?;
    let mut cfg = RunConfig::parse(std::path::Path::new("examples/demo.toml"), DEMO)?;
    cache_recordings(&mut cfg, &store);
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
