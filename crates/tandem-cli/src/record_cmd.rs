use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use tandem_models::assets::Store;
use tandem_run::config::TierKind;
use tandem_run::recording::RecordingLlm;
use tandem_run::{stream, RunConfig};

#[derive(Args, Debug)]
pub struct RecordArgs {
    /// The cascade config that defines the tier.
    #[arg(long)]
    config: PathBuf,
    /// The tier to record (an LLM tier: kind gguf).
    #[arg(long)]
    tier: String,
    /// A JSONL file, `-` for standard input, or a built-in dataset (`snippets`, `amazon`).
    #[arg(long, default_value = "snippets")]
    input: String,
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The recording to write (appended to; entries already there are kept and not recomputed).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_parser = crate::at_least_one())]
    threads: Option<usize>,
}

pub fn run(a: RecordArgs) -> Result<()> {
    crate::run_cmd::set_threads(a.threads);
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("cannot read {}", a.config.display()))?;
    let mut cfg = RunConfig::parse(&a.config, &text)?;
    let store = Store::default_home();
    let Some(t) = cfg.tiers.iter_mut().find(|t| t.name == a.tier) else {
        bail!(
            "{}: no tier named {:?} (tiers: {})",
            a.config.display(),
            a.tier,
            cfg.tiers
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    if t.kind != TierKind::Gguf {
        bail!("tier {:?} is a learner: its answers depend on what it has learned, so only LLM tiers (kind gguf) are recorded", a.tier);
    }
    t.recording = Some(a.out.clone());
    let cfg = cfg;
    let mut s = stream::open(&a.input, &cfg, a.seed, &store)?;
    if let Some(l) = a.limit {
        s.items.truncate(l);
    }
    let Some(tcfg) = cfg.tiers.iter().find(|t| t.name == a.tier) else {
        bail!("tier {:?} not found", a.tier)
    };
    let mut tier = tandem_run::tiers::build_one(&cfg, tcfg, &store)?;
    let tandem_run::tiers::TierModel::Llm(llm) = &mut tier.model else {
        bail!("tier {:?} is not an LLM tier", a.tier)
    };
    let llm: &mut RecordingLlm = llm;
    let bar = crate::progress::Progress::new(
        &format!("items recorded by tier {}", a.tier),
        s.items.len() as u64,
    );
    for item in &s.items {
        tandem_models::classifier::Classifier::predict(llm, &item.text)?;
        bar.inc(1);
    }
    llm.flush()?;
    bar.finish();
    println!(
        "{}: {} items of {} ({} already recorded, {} computed now)",
        a.out.display(),
        s.items.len(),
        s.name,
        llm.hits,
        llm.misses
    );
    Ok(())
}
