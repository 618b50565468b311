//! `tandem train`: fits a prior (the route-before router and the cascade scorer) on recorded files.

use crate::eval_cmd::{describe_prior, load_data, pick_models};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use tandem_core::policy::cascade::CascadeConfig;
use tandem_core::policy::router::RouterConfig;
use tandem_eval::train::{train, TrainConfig, TrainSet};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Recorded answers (the `tandem eval` format), or a labelled file of your own; repeat for
    /// several files. Each must hold the weak and the strong model (two models: the less and the
    /// more accurate, unless --weak/--strong name them).
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Where to write the prior (`tandem eval --prior`, `prior = "…"` on a gateway route).
    #[arg(long)]
    out: PathBuf,
    /// The weak model's name in every file.
    #[arg(long)]
    weak: Option<String>,
    /// The strong model's name in every file.
    #[arg(long)]
    strong: Option<String>,
    /// Passes over the shuffled records.
    #[arg(long, default_value_t = 3)]
    epochs: u32,
    /// Seeds the shuffle.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Hashed feature space: 2^bits weights per model. The gateway's learners use 18 (a prior
    /// for a gateway route must match it); `tandem eval` uses the prior's own.
    #[arg(long, default_value_t = 18)]
    bits: u32,
    /// Do not use the records' metadata (e.g. `subject`) as router features.
    #[arg(long)]
    no_metadata: bool,
    /// Skip malformed lines (and report how many) instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
    /// The router also reads MiniLM sentence vectors of the prompts, and the cascade scorer those
    /// of the prompts and the weak answers (`tandem eval --embed`); a front end using the prior
    /// must read them too.
    #[arg(long)]
    embed: bool,
}

pub fn run(a: TrainArgs) -> Result<()> {
    if !(8..=24).contains(&a.bits) {
        bail!("--bits {}: must be 8 to 24", a.bits);
    }
    let mut sets = Vec::new();
    for path in &a.data {
        let data = load_data(path, a.skip_bad)?;
        let (weak, strong) = pick_models(&data, a.weak.as_deref(), a.strong.as_deref())?;
        sets.push(TrainSet {
            data: Arc::new(data),
            weak,
            strong,
        });
    }
    let cfg = TrainConfig {
        epochs: a.epochs,
        seed: a.seed,
        router: RouterConfig {
            bits: a.bits,
            use_metadata: !a.no_metadata,
            ..RouterConfig::default()
        },
        cascade: CascadeConfig {
            bits: a.bits,
            ..CascadeConfig::default()
        },
        embedder: if a.embed {
            Some(crate::eval_cmd::embed_texts(
                &sets
                    .iter()
                    .map(|s| {
                        // The weak answers too, where the cascade scorer learns from them.
                        let responses = s.data.has_responses(s.weak).then_some(s.weak);
                        crate::eval_cmd::ToEmbed {
                            data: s.data.clone(),
                            responses_of: responses,
                            rows: None,
                        }
                    })
                    .collect::<Vec<_>>(),
            )?)
        } else {
            None
        },
    };
    let prior = train(&sets, &cfg)?;
    prior.save(&a.out)?;
    println!("wrote {}", describe_prior(&a.out, &prior));
    Ok(())
}
