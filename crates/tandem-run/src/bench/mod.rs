//! `tandem bench cascade`: every policy over the same live cascade, on the same items in several
//! stream orders, side by side. The top tier's answers come from its recording (filled on the
//! first run) and the encoder's vectors from an embedding cache, so a run of the whole stream
//! takes about a second and a sweep of dozens of runs takes minutes; what each tier would have
//! cost in compute is still charged, as measured when it was recorded.

pub mod plot;
pub mod summary;

use crate::config::{L4s, PolicyConfig, PolicyKind, RunConfig, S4l, TierKind};
use crate::error::RunError;
use crate::live::{self, Outcome, Progress, RunOptions};
use crate::stream::{Item, Stream};
use crate::tiers::{build_one, TierModel, TierSetup};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tandem_models::assets::Store;
use tandem_models::classifier::{EmbeddingCache, KnnTier, MiniLmHead, ModelError};
use tandem_models::embed_cache;
use tandem_models::minilm::MiniLm;

/// One labelled stream and the cascade to run on it.
pub struct Dataset {
    pub name: String,
    pub cfg: RunConfig,
    pub stream: Stream,
    /// Labelled items held out of the stream, which the cheap tiers learn before every run
    /// (`tandem run --pretrain`); empty: they start from nothing.
    pub pretrain: Vec<Item>,
}

/// What to run: seeds (stream orders) and the knobs each policy family is swept over.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seeds: Vec<u64>,
    /// Target top-tier shares for the policies that hold one (OCL, E-LANG, shunt, random).
    pub shares: Vec<f64>,
    /// Fixed confidence thresholds for the plain DS+ shunt.
    pub thresholds: Vec<f32>,
    /// The share of the table's rows (and of the S4L / L4S variants).
    pub operating: f64,
    /// Shares at which the frontiers are compared.
    pub compare_at: Vec<f64>,
    /// Run the soft-S4L rows (they call the top model with hinted prompts not yet recorded)...
    pub s4l: bool,
    /// ...over this many of the stream orders (the first ones).
    pub s4l_seeds: usize,
    pub threads: usize,
    /// Shuffle the stream by each seed (a benchmark's stream orders); false: every run takes the
    /// items in the dataset's order, as a live run of that stream did (the seed still drives the
    /// policies' random choices).
    pub shuffle: bool,
}

/// One cascade run's policy: a family (a curve on the plot), its knob, and how it is set.
#[derive(Debug, Clone)]
pub struct Variant {
    pub family: &'static str,
    pub knob: f64,
    pub policy: PolicyConfig,
    /// Per cheap tier: a fixed threshold (`f32::INFINITY` never answers, 0 always answers once
    /// warm), overriding the configuration.
    pub thresholds: Option<Vec<f32>>,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub family: &'static str,
    pub knob: f64,
    pub seed: u64,
    pub items: u64,
    pub accuracy: f64,
    pub agreement: f64,
    pub top_share: f64,
    pub cost_usd: f64,
    pub compute_s: f64,
    /// Per cheap tier, its accuracy on every item it predicted on (before learning from it).
    pub tier_accuracy: Vec<f64>,
    /// Per cheap tier, the share of items it answered.
    pub tier_answered: Vec<f64>,
    /// S4L: items answered by the top tier with the hint, and how many were right with it and
    /// (from the unhinted recording) without it.
    pub s4l_items: u64,
    pub s4l_right_with: u64,
    pub s4l_right_without: u64,
}

/// The policy families, in table order. `Always` names are single runs.
pub const ALWAYS_TOP: &str = "always-top";

pub fn variants(cfg: &RunConfig, plan: &Plan) -> Vec<Variant> {
    let cheap = cfg.tiers.len() - 1;
    // Every policy's cheap tiers are taught as the configuration says (gold labels or the top
    // tier's answers), so families differ only in their deferral.
    let base = PolicyConfig {
        teach: cfg.policy.teach,
        ..PolicyConfig::default()
    };
    let held = |family: &'static str, kind: PolicyKind, share: f64| Variant {
        family,
        knob: share,
        policy: PolicyConfig {
            kind,
            target_top_share: Some(share),
            ..base.clone()
        },
        thresholds: None,
    };
    let mut v = Vec::new();
    let mut only = vec![f32::INFINITY; cheap];
    v.push(Variant {
        family: ALWAYS_TOP,
        knob: 1.0,
        policy: base.clone(),
        thresholds: Some(only.clone()),
    });
    for (i, t) in cfg.tiers[..cheap].iter().enumerate() {
        only.fill(f32::INFINITY);
        only[i] = 0.0;
        v.push(Variant {
            family: leak(format!("{} alone", t.name)),
            knob: 0.0,
            policy: base.clone(),
            thresholds: Some(only.clone()),
        });
    }
    for &t in &plan.thresholds {
        v.push(Variant {
            family: "DS+ shunt (fixed threshold)",
            knob: f64::from(t),
            policy: base.clone(),
            thresholds: Some(vec![t; cheap]),
        });
    }
    for &s in &plan.shares {
        v.push(held("random deferral", PolicyKind::Random, s));
        v.push(held("DS+ shunt (share held)", PolicyKind::MaxProb, s));
        v.push(held("E-LANG energy", PolicyKind::Energy, s));
        v.push(held("OCL", PolicyKind::Ocl, s));
        let mut words = held("OCL + words", PolicyKind::Ocl, s);
        words.policy.text_features = Some(true);
        v.push(words);
    }
    let s = plan.operating;
    let mut l4s = held("DS+ shunt + L4S weighted", PolicyKind::MaxProb, s);
    l4s.policy.l4s = L4s::Weighted;
    v.push(l4s);
    let mut hard = held("DS+ shunt + S4L hard", PolicyKind::MaxProb, s);
    hard.policy.s4l = S4l::Hard;
    v.push(hard);
    if plan.s4l {
        let mut soft = held("DS+ shunt + S4L soft", PolicyKind::MaxProb, s);
        soft.policy.s4l = S4l::Soft;
        v.push(soft);
        let mut ocl = held("OCL + S4L soft", PolicyKind::Ocl, s);
        ocl.policy.s4l = S4l::Soft;
        v.push(ocl);
    }
    v
}

/// Family names built from tier names live as long as the process (a handful per benchmark).
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// What every run of a dataset shares: the encoder's vectors and the top tier's unhinted answers.
pub struct Prepared {
    pub embeddings: Arc<EmbeddingCache>,
    /// The top tier's label per item id (from its recording).
    pub top_label: HashMap<String, usize>,
}

/// Stages of preparation, for a progress display.
pub enum Stage {
    Embedding,
    Recording,
}

/// Embeds every text (cached on disk) and makes sure the top tier's recording holds every item
/// (recording the missing ones with the real model, which is slow the first time).
pub fn prepare(
    ds: &Dataset,
    store: &Store,
    progress: &mut dyn FnMut(Stage, usize, usize),
) -> Result<Prepared, RunError> {
    let texts: Vec<&str> = ds
        .stream
        .items
        .iter()
        .chain(&ds.pretrain)
        .map(|i| i.text.as_str())
        .collect();
    let mut embeddings = EmbeddingCache::new();
    // Both MiniLM-based kinds read the same vectors (one cache per encoder setting).
    for t in ds
        .cfg
        .tiers
        .iter()
        .filter(|t| matches!(t.kind, TierKind::Minilm | TierKind::Knn))
    {
        let max_tokens = t.max_tokens.unwrap_or(128);
        let (path, dir) = embed_cache::minilm_cache(store, &ds.name, max_tokens)?;
        let mut load = || MiniLm::load(&dir, max_tokens).map_err(ModelError::from);
        embeddings = embed_cache::load_or_build(
            &path,
            &mut load,
            &texts,
            t.batch.unwrap_or(32),
            &mut |d, n| progress(Stage::Embedding, d, n),
        )?;
    }
    let top_cfg = ds
        .cfg
        .tiers
        .last()
        .ok_or_else(|| RunError::Invalid("no tiers".into()))?;
    let mut top = build_one(&ds.cfg, top_cfg, store)?;
    let mut top_label = HashMap::new();
    let n = ds.stream.items.len();
    for (k, item) in ds.stream.items.iter().enumerate() {
        let p = top.model.classifier().predict(&item.text)?;
        top_label.insert(item.id.clone(), p.label());
        progress(Stage::Recording, k + 1, n);
    }
    if let TierModel::Llm(l) = &mut top.model {
        l.flush()?;
    }
    Ok(Prepared {
        embeddings: Arc::new(embeddings),
        top_label,
    })
}

/// The items in the order of `seed` (the same items for every seed).
pub fn ordered(stream: &Stream, seed: u64) -> Stream {
    let mut items: Vec<Item> = stream.items.clone();
    items.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    Stream {
        name: stream.name.clone(),
        items,
        truncated: stream.truncated,
    }
}

fn tiers_for(
    ds: &Dataset,
    prep: &Prepared,
    v: &Variant,
    store: &Store,
) -> Result<Vec<TierSetup>, RunError> {
    let classes = ds.cfg.labels.len();
    let mut tiers = Vec::with_capacity(ds.cfg.tiers.len());
    for (i, t) in ds.cfg.tiers.iter().enumerate() {
        let mut setup = if t.kind == TierKind::Minilm {
            TierSetup {
                name: t.name.clone(),
                model: TierModel::Learner(Box::new(MiniLmHead::over_embeddings(
                    prep.embeddings.clone(),
                    classes,
                    t.learning_rate.unwrap_or(0.05),
                )?)),
                price: t.price(),
                threshold: t.threshold.unwrap_or(0.9),
                warmup: t.warmup.unwrap_or(100),
            }
        } else if t.kind == TierKind::Knn {
            TierSetup {
                name: t.name.clone(),
                model: TierModel::Learner(Box::new(KnnTier::over_embeddings(
                    prep.embeddings.clone(),
                    classes,
                    t.knn_memory(),
                    t.knn_k(),
                )?)),
                price: t.price(),
                threshold: t.threshold.unwrap_or(0.9),
                warmup: t.warmup.unwrap_or(100),
            }
        } else {
            build_one(&ds.cfg, t, store)?
        };
        if let Some(th) = v.thresholds.as_ref().and_then(|th| th.get(i)) {
            setup.threshold = *th;
        }
        tiers.push(setup);
    }
    Ok(tiers)
}

/// One cascade run of `v` over the stream in the order of `seed` (`shuffle`), or in its own.
pub fn run_one(
    ds: &Dataset,
    prep: &Prepared,
    v: &Variant,
    seed: u64,
    shuffle: bool,
    store: &Store,
) -> Result<RunResult, RunError> {
    let stream = if shuffle {
        ordered(&ds.stream, seed)
    } else {
        ds.stream.clone()
    };
    let mut tiers = tiers_for(ds, prep, v, store)?;
    if !ds.pretrain.is_empty() {
        live::pretrain(&mut tiers, &ds.pretrain, &mut |_| {})?;
    }
    let mut cfg = ds.cfg.clone();
    cfg.policy = v.policy.clone();
    let mut cascade = live::cascade_for(&cfg, &tiers, seed)?;
    let opts = RunOptions {
        output: None,
        state_dir: None,
        resume: false,
        checkpoint_every: u64::MAX,
        lookahead: 1,
        teach_gold: cfg.policy.teach == crate::config::Teach::Gold,
    };
    let top = tiers.len() - 1;
    let (mut agree, mut s4l_items, mut with, mut without) = (0u64, 0u64, 0u64, 0u64);
    let mut observe = |p: &Progress| {
        let Some(item) = stream.items.get(p.done as usize - 1) else {
            return;
        };
        let Outcome { tier, label, s4l } = p.last;
        let top_label = prep.top_label.get(&item.id).copied();
        agree += u64::from(top_label == Some(label));
        if s4l && tier == top {
            if let (Some(g), Some(t)) = (item.gold, top_label) {
                s4l_items += 1;
                with += u64::from(label == g);
                without += u64::from(t == g);
            }
        }
    };
    let state = live::run(
        &stream,
        &cfg.labels,
        &mut tiers,
        &mut cascade,
        cfg.budget.limits().map_err(RunError::Invalid)?,
        "bench",
        &opts,
        &mut observe,
    )?;
    let n = state.items_done.max(1) as f64;
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Ok(RunResult {
        family: v.family,
        knob: v.knob,
        seed,
        items: state.items_done,
        accuracy: ratio(state.correct, state.with_gold),
        agreement: agree as f64 / n,
        top_share: state.tiers[top].predicted as f64 / n,
        cost_usd: state.tiers.iter().map(|t| t.cost_micros).sum::<u64>() as f64 / 1e6,
        compute_s: state.tiers.iter().map(|t| t.compute_us).sum::<u64>() as f64 / 1e6,
        tier_accuracy: state.tiers[..top]
            .iter()
            .map(|t| ratio(t.correct, t.with_gold))
            .collect(),
        tier_answered: state.tiers[..top]
            .iter()
            .map(|t| t.answered as f64 / n)
            .collect(),
        s4l_items,
        s4l_right_with: with,
        s4l_right_without: without,
    })
}

/// Every variant under every seed (soft S4L under the first `s4l_seeds`).
pub fn jobs<'a>(vs: &'a [Variant], plan: &Plan) -> Vec<(&'a Variant, u64)> {
    vs.iter()
        .flat_map(|v| {
            let n = if v.policy.s4l == S4l::Soft {
                plan.s4l_seeds.max(1)
            } else {
                plan.seeds.len()
            };
            plan.seeds.iter().take(n).map(move |&s| (v, s))
        })
        .collect()
}

/// Every job of `jobs`, on `plan.threads` threads; `done(k, n)` after each run.
pub fn run_all(
    ds: &Dataset,
    prep: &Prepared,
    plan: &Plan,
    store: &Store,
    done: &(dyn Fn(usize, usize) + Sync),
) -> Result<Vec<RunResult>, RunError> {
    let vs = variants(&ds.cfg, plan);
    let jobs = jobs(&vs, plan);
    let next = AtomicUsize::new(0);
    let finished = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<RunResult, RunError>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..plan.threads.max(1) {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some((v, seed)) = jobs.get(k) else {
                    break;
                };
                let r = run_one(ds, prep, v, *seed, plan.shuffle, store);
                if let Ok(mut all) = results.lock() {
                    all[k] = Some(r);
                }
                done(finished.fetch_add(1, Ordering::Relaxed) + 1, jobs.len());
            });
        }
    });
    let all = results
        .into_inner()
        .map_err(|_| RunError::Invalid("a benchmark worker failed".into()))?;
    all.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| Err(RunError::Invalid("a benchmark run did not finish".into())))
        })
        .collect()
}
