//! Warm start: fits a [`Prior`] — the route-before router and, where the weak model's responses
//! are recorded, the cascade scorer — on recorded files, the same learners and features the online
//! policies use. Every record teaches both models' revealed outcomes (full feedback), in a seeded
//! shuffle of all files together, for a number of passes. A user's own labelled JSONL (the same
//! format) trains the same way.

use crate::data::Dataset;
use crate::error::EvalError;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use tandem_core::policy::cascade::{CascadeConfig, ResponseCascade};
use tandem_core::policy::router::{GainRouter, RouterConfig};
use tandem_core::policy::{CascadeScorer, Observation, RouteScorer};
use tandem_core::prior::{Prior, PriorInfo, TrainedOn, PRIOR_VERSION};
use tandem_core::{Answer, Output, Usage};

/// One recorded file and which of its models are the weak and the strong one.
pub struct TrainSet {
    pub data: Arc<Dataset>,
    pub weak: usize,
    pub strong: usize,
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Passes over the shuffled records (at least 1).
    pub epochs: u32,
    pub seed: u64,
    pub router: RouterConfig,
    pub cascade: CascadeConfig,
    /// Sentence vectors of the prompts (and the weak answers): the router and the cascade scorer
    /// read them (their configurations are set for them), and the prior names the encoder, so
    /// it is never fed another's.
    pub embedder: Option<Arc<dyn tandem_core::embed::Embedder>>,
}

/// Fits a prior on `sets`.
///
/// Errors: no sets, no records, `epochs` = 0, a weak model that is also the strong one, or a
/// learner configuration the core refuses.
pub fn train(sets: &[TrainSet], cfg: &TrainConfig) -> Result<Prior, EvalError> {
    if cfg.epochs == 0 {
        return Err(EvalError::Invalid("--epochs must be at least 1".into()));
    }
    if sets.iter().all(|s| s.data.rows.is_empty()) {
        return Err(EvalError::Invalid("no records to train on".into()));
    }
    for s in sets {
        if s.weak == s.strong {
            return Err(EvalError::Invalid(format!(
                "{}: the weak and the strong model are the same ({})",
                s.data.path.display(),
                s.data.models.get(s.weak).map_or("?", String::as_str)
            )));
        }
    }
    let responses: Vec<bool> = sets.iter().map(|s| s.data.has_responses(s.weak)).collect();
    let mut router = match &cfg.embedder {
        Some(e) => {
            GainRouter::new(cfg.router.with_embeddings(e.dim()))?.with_embedder(e.clone())?
        }
        None => GainRouter::new(cfg.router)?,
    };
    let mut cascade = match (responses.iter().any(|&r| r), &cfg.embedder) {
        (false, _) => None,
        (true, Some(e)) => Some(
            ResponseCascade::new(cfg.cascade.with_embeddings(e.dim()))?.with_embedder(e.clone())?,
        ),
        (true, None) => Some(ResponseCascade::new(cfg.cascade)?),
    };
    // Every (file, row) pair, shuffled anew each pass: files mix, and no pass sees one order.
    let mut order: Vec<(usize, usize)> = sets
        .iter()
        .enumerate()
        .flat_map(|(f, s)| (0..s.data.rows.len()).map(move |i| (f, i)))
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    for epoch in 0..cfg.epochs {
        order.shuffle(&mut rng);
        for &(f, i) in &order {
            let set = &sets[f];
            let Some(row) = set.data.rows.get(i) else {
                continue;
            };
            // Ids are unique within a file, not across files: the learners cache features by id.
            let mut q = row.query.clone();
            q.id = format!("{f}:{}", q.id);
            let outcome = |m: usize| row.quality.get(m).copied();
            let o = Observation {
                weak: outcome(set.weak),
                strong: outcome(set.strong),
            };
            // The neighbour memory holds each item once: later passes teach the linear models.
            if epoch == 0 {
                router.learn(&q, &o);
            } else {
                router.learn_linear(&q, &o);
            }
            let text = row.response.get(set.weak).cloned().flatten();
            if let (Some(c), Some(text)) = (cascade.as_mut(), text) {
                let weak = Answer {
                    tier: set.data.models[set.weak].clone(),
                    output: Output::Text {
                        text,
                        token_logprobs: None,
                    },
                    usage: Usage::default(),
                    cost: 0,
                    compute: std::time::Duration::ZERO,
                };
                if epoch == 0 {
                    c.learn(&q, &weak, &o);
                } else {
                    c.learn_linear(&q, &weak, &o);
                }
            }
        }
    }
    let trained_on = sets
        .iter()
        .zip(&responses)
        .map(|(s, &r)| TrainedOn {
            file: s.data.path.display().to_string(),
            items: s.data.rows.len() as u64,
            weak: s.data.models[s.weak].clone(),
            strong: s.data.models[s.strong].clone(),
            responses: r,
        })
        .collect();
    Ok(Prior {
        info: PriorInfo {
            version: PRIOR_VERSION,
            router: Some(router.config()),
            cascade: cascade.as_ref().map(ResponseCascade::config),
            trained_on,
            embedder: router.embedder_name().map(str::to_string),
            epochs: cfg.epochs,
            seed: cfg.seed,
        },
        router: Some(router),
        cascade,
    })
}
