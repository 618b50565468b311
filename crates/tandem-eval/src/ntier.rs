//! `tandem eval` over recorded answers of N ≥ 2 models: the models, ordered by what their answers
//! cost, form a cascade of replay tiers that the core engine (`Cascade::serve`) runs, cheapest
//! first. Each share-holding policy is run once per top-tier share on a grid; each run's quality,
//! dollars and top-tier share is one point of its frontier. Each model alone is a reference point.
//!
//! Replayed tiers expose no class probabilities and no comparable answers (only whether each
//! answer was right, which the policies must not see), so the policies that apply are those that
//! need neither: random deferral at a share, OCL's learned deferral learning from revealed
//! outcomes (below), and the oracle (a ceiling).

use crate::data::Dataset;
use crate::error::EvalError;
use crate::replay::ReplayTier;
use crate::report::{off_target, FrontierPoint, LadderModel, LadderReport, LadderRow};
use crate::runner::{outcome, Pass, Replayed, Tally};
use crate::sweep::{decision_us, in_parallel, run_seed, share_grid, stream_order, Sweep};
use std::sync::Arc;
use tandem_core::engine::Cascade;
use tandem_core::metrics::{Curve, CurvePoint};
use tandem_core::money::micros_to_usd;
use tandem_core::policy::ocl::{DeferralConfig, OclOutcomes};
use tandem_core::policy::random::RandomDeferral;
use tandem_core::policy::teaching::Teaching;
use tandem_core::policy::{Deferral, FeedbackMode, ItemState, Step};
use tandem_core::{BudgetLimits, Micros, Price, Query, Tier};

/// The models of a recorded file as a cascade: model indices and prices, cheapest first.
#[derive(Debug, Clone)]
pub struct Ladder {
    pub data: Arc<Dataset>,
    pub models: Vec<usize>,
    pub prices: Vec<Price>,
    pub default_output_tokens: u64,
}

impl Ladder {
    /// The named models (all of the file's when `names` is empty), priced by `prices` (model name
    /// and price; a model whose cost the file records needs none) and ordered by their mean cost
    /// per item, cheapest first (ties by name, so the order never depends on the file's).
    pub fn new(
        data: Arc<Dataset>,
        names: &[String],
        prices: &[(String, Price)],
        default_output_tokens: u64,
    ) -> Result<Self, EvalError> {
        let bad = |message: String| EvalError::BadFile {
            path: data.path.clone(),
            message,
        };
        let mut models = Vec::new();
        if names.is_empty() {
            models.extend(0..data.models.len());
        } else {
            for n in names {
                let m = data.model_index(n)?;
                if models.contains(&m) {
                    return Err(EvalError::Invalid(format!(
                        "--tiers names model {n:?} twice"
                    )));
                }
                models.push(m);
            }
        }
        if models.len() < 2 {
            return Err(bad(format!(
                "a cascade needs at least two models; {} given",
                models.len()
            )));
        }
        if let Some((n, _)) = prices.iter().find(|(n, _)| !data.models.contains(n)) {
            return Err(bad(format!(
                "--price names model {n:?}, which is not in the file (it has: {})",
                data.models.join(", ")
            )));
        }
        for (k, (n, _)) in prices.iter().enumerate() {
            if prices[..k].iter().any(|(p, _)| p == n) {
                return Err(EvalError::Invalid(format!(
                    "--price names model {n:?} twice"
                )));
            }
            // A recorded cost is what the model was charged: a price would be ignored.
            if data.model_index(n).is_ok_and(|m| data.has_costs(m)) {
                return Err(EvalError::Invalid(format!(
                    "--price {n}: the file records what each of {n:?}'s answers cost (`cost.{n}`), which is what it is charged; drop the --price"
                )));
            }
        }
        let unpriced: Vec<&str> = models
            .iter()
            .map(|&m| data.models[m].as_str())
            .filter(|name| {
                !prices.iter().any(|(n, _)| n == name)
                    && !data.model_index(name).is_ok_and(|m| data.has_costs(m))
            })
            .collect();
        if unpriced.len() > 1 {
            return Err(bad(format!(
                "models {} have no price: record field `cost.NAME` (dollars) on every line, or give --price NAME=token:IN[:OUT] or --price NAME=call:USD for each",
                unpriced.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
            )));
        }
        let mut tiers = Vec::with_capacity(models.len());
        for &m in &models {
            let name = &data.models[m];
            let price = match prices.iter().rev().find(|(n, _)| n == name) {
                Some((_, p)) => *p,
                // Never charged: every answer's recorded cost is.
                None if data.has_costs(m) => Price::Call { micros: 0 },
                None => {
                    return Err(bad(format!(
                        "model {name:?} has no price: record field `cost.{name}` (dollars) on every line, or give --price {name}=token:IN[:OUT] or --price {name}=call:USD"
                    )))
                }
            };
            let tier = ReplayTier::new(data.clone(), m, price, default_output_tokens)?;
            let total: Micros = data
                .rows
                .iter()
                .map(|r| tier.estimate_cost(&r.query))
                .fold(0, Micros::saturating_add);
            tiers.push((total, name.clone(), m, price));
        }
        tiers.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        Ok(Ladder {
            models: tiers.iter().map(|t| t.2).collect(),
            prices: tiers.iter().map(|t| t.3).collect(),
            data,
            default_output_tokens,
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.models
            .iter()
            .map(|&m| self.data.models[m].clone())
            .collect()
    }

    fn replayed(&self) -> Result<Replayed, EvalError> {
        let tiers = self
            .models
            .iter()
            .zip(&self.prices)
            .map(|(&m, &p)| ReplayTier::new(self.data.clone(), m, p, self.default_output_tokens))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Replayed { tiers })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LadderPolicy {
    /// The core's random deferral: the target share to the top tier, the last cheap tier the rest.
    Random,
    /// OCL's learned deferral with its cost-to-go, learning from revealed outcomes.
    Ocl,
    /// Knows the outcomes: the cheapest model that is right (the top one if none is). A ceiling.
    Oracle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LadderSpec {
    pub policy: LadderPolicy,
    pub feedback: FeedbackMode,
}

impl LadderSpec {
    pub fn name(&self) -> &'static str {
        match self.policy {
            LadderPolicy::Random => "random",
            LadderPolicy::Ocl => "ocl",
            LadderPolicy::Oracle => "oracle",
        }
    }

    /// Share-holding policies get a frontier; the oracle is one point.
    fn has_frontier(&self) -> bool {
        self.policy != LadderPolicy::Oracle
    }
}

/// Random, the oracle, and OCL in both feedback modes.
pub fn default_ladder_policies() -> Vec<LadderSpec> {
    let spec = |policy, feedback| LadderSpec { policy, feedback };
    vec![
        spec(LadderPolicy::Random, FeedbackMode::None),
        spec(LadderPolicy::Oracle, FeedbackMode::None),
        spec(LadderPolicy::Ocl, FeedbackMode::Full),
        spec(LadderPolicy::Ocl, FeedbackMode::Partial),
    ]
}

/// Enters at the cheapest tier that is right — graded, the cheapest with the best score —
/// (peeking at the outcomes) and answers there.
struct Oracle {
    quality: Vec<Vec<f32>>,
    index: std::collections::HashMap<String, usize>,
}

impl Deferral for Oracle {
    fn name(&self) -> &'static str {
        "oracle"
    }

    fn entry(&mut self, _item: &mut ItemState, query: &Query, top: usize) -> usize {
        self.index
            .get(&query.id)
            .and_then(|&i| self.quality.get(i))
            // The cheapest tier whose answer is as good as any tier's (right, or the best score).
            .and_then(|q| {
                let best = q.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // None right (all zero): the top, as with right/wrong outcomes.
                q.iter().position(|&x| x >= best && x > 0.0)
            })
            .unwrap_or(top)
    }

    fn defer(&mut self, _: &mut ItemState, _: &Step) -> bool {
        false
    }
}

#[derive(Debug, Clone)]
pub struct LadderRunConfig {
    pub spec: LadderSpec,
    pub target_share: f64,
    pub explore: f64,
    pub seed: u64,
    pub budget: BudgetLimits,
    pub time_decisions: bool,
}

#[derive(Debug, Clone, Default)]
pub struct LadderOutcome {
    pub tally: Tally,
    /// Per tier, cheapest first: items it answered, and calls made to it.
    pub answered: Vec<u64>,
    pub calls: Vec<u64>,
}

impl LadderOutcome {
    /// Share of items on which the top tier was called.
    pub fn top_share(&self) -> f64 {
        self.calls.last().copied().unwrap_or(0) as f64 / self.tally.items.max(1) as f64
    }

    pub fn answered_shares(&self) -> Vec<f64> {
        self.answered
            .iter()
            .map(|&a| a as f64 / self.tally.items.max(1) as f64)
            .collect()
    }
}

/// One online pass of `cfg.spec` over `order` (indices into the rows) through the core engine.
pub fn run_ladder(
    ladder: &Ladder,
    order: &[usize],
    cfg: &LadderRunConfig,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<LadderOutcome, EvalError> {
    let data = &ladder.data;
    let n = ladder.models.len();
    let top = n - 1;
    let policy: Box<dyn Deferral> = match cfg.spec.policy {
        LadderPolicy::Random => Box::new(
            // As the gateway pays: only the tier that answers is called.
            RandomDeferral::new(cfg.target_share, cfg.seed).calling_only_what_answers(),
        ),
        LadderPolicy::Ocl => Box::new(OclOutcomes::new(
            top,
            DeferralConfig {
                target_top_share: Some(cfg.target_share),
                // With every outcome revealed there is nothing to explore for.
                explore: match cfg.spec.feedback {
                    FeedbackMode::Partial => cfg.explore,
                    _ => 0.0,
                },
                text_features: true,
                seed: cfg.seed,
                ..DeferralConfig::default()
            },
        )?),
        LadderPolicy::Oracle => Box::new(Oracle {
            quality: data
                .rows
                .iter()
                .map(|r| ladder.models.iter().map(|&m| r.quality[m]).collect())
                .collect(),
            index: data
                .rows
                .iter()
                .enumerate()
                .map(|(i, r)| (r.query.id.clone(), i))
                .collect(),
        }),
    };
    let mut cascade = Cascade::new(n, policy, Teaching::default())?;
    let mut tiers = ladder.replayed()?;
    let pass = Pass {
        data,
        order,
        budget: cfg.budget,
        time_decisions: cfg.time_decisions,
        progress,
    };
    let (mut answered, mut calls) = (vec![0; n], vec![0; n]);
    let tally = pass.run(&mut cascade, &mut tiers, |row, served, observed| {
        for c in &served.calls {
            if let Some(k) = calls.get_mut(c.tier) {
                *k += 1;
            }
        }
        let ok = |tier: usize| ladder.models.get(tier).map_or(0.0, |&m| row.quality[m]);
        if let Some(a) = answered.get_mut(served.tier) {
            *a += 1;
        }
        // Full: every model's outcome. Partial: what a deployment sees, the served answer's
        // outcome, and every called tier's when the policy explored.
        for (t, o) in observed.iter_mut().enumerate() {
            let called = served.calls.iter().any(|c| c.tier == t);
            let shown = match cfg.spec.feedback {
                FeedbackMode::None => false,
                FeedbackMode::Full => true,
                FeedbackMode::Partial => t == served.tier || (served.explored && called),
            };
            *o = if shown { outcome(ok(t)) } else { None };
        }
        ok(served.tier)
    })?;
    Ok(LadderOutcome {
        tally,
        answered,
        calls,
    })
}

#[derive(Debug, Clone)]
pub struct LadderConfig {
    pub seed: u64,
    /// The top-tier share of the operating point (the table's row per policy).
    pub target_share: f64,
    /// Exploration of partial-feedback runs.
    pub explore: f64,
    pub grid: usize,
    pub budget: BudgetLimits,
    pub threads: usize,
    pub limit: Option<usize>,
    pub policies: Vec<LadderSpec>,
}

impl LadderConfig {
    pub fn validate(&self) -> Result<(), EvalError> {
        self.sweep().validate()
    }

    fn sweep(&self) -> Sweep {
        Sweep {
            target_share: self.target_share,
            explore: self.explore,
            explore_max: 1.0,
            grid: self.grid,
            limit: self.limit,
            policies: self.policies.len(),
            budget: self.budget,
        }
    }
}

/// How many items all runs of [`evaluate_ladder`] process, for a progress bar.
pub fn ladder_work(cfg: &LadderConfig, items: usize) -> u64 {
    let curves = cfg.policies.iter().filter(|p| p.has_frontier()).count();
    cfg.sweep().work(items, curves)
}

/// Every policy's frontier (one online run per share of the grid, in parallel) and its
/// operating point (alone, to time its decisions), with each model alone as a reference.
pub fn evaluate_ladder(
    ladder: &Ladder,
    cfg: &LadderConfig,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<LadderReport, EvalError> {
    cfg.validate()?;
    let data = &ladder.data;
    // The same stream as the two-model eval's for the same seed.
    let order = stream_order(data.rows.len(), cfg.seed, cfg.limit);
    let n_items = order.len() as f64;
    let replayed = ladder.replayed()?;
    let models: Vec<LadderModel> = ladder
        .models
        .iter()
        .zip(&replayed.tiers)
        .map(|(&m, t)| {
            let score: f64 = order
                .iter()
                .map(|&i| f64::from(data.rows[i].quality[m]))
                .sum();
            let cost: Micros = order
                .iter()
                .map(|&i| t.estimate_cost(&data.rows[i].query))
                .fold(0, Micros::saturating_add);
            LadderModel {
                name: data.models[m].clone(),
                quality: score / n_items,
                cost_usd: micros_to_usd(cost),
                recorded_cost: data.has_costs(m),
            }
        })
        .collect();
    let (q_low, q_top) = match (models.first(), models.last()) {
        (Some(a), Some(b)) => (a.quality, b.quality),
        _ => (0.0, 0.0),
    };

    let grid = share_grid(cfg.grid);
    let run_cfg = |p: usize, point: Option<usize>| LadderRunConfig {
        spec: cfg.policies[p],
        target_share: point.map_or(cfg.target_share, |g| grid[g]),
        explore: cfg.explore,
        seed: run_seed(cfg.seed, point.unwrap_or(usize::MAX - 1)),
        budget: cfg.budget,
        time_decisions: point.is_none(),
    };
    let jobs: Vec<(usize, usize)> = cfg
        .policies
        .iter()
        .enumerate()
        .filter(|(_, s)| s.has_frontier())
        .flat_map(|(p, _)| (0..grid.len()).map(move |g| (p, g)))
        .collect();
    // Frontier runs in parallel: each depends only on its own seed.
    let results = in_parallel(&jobs, cfg.threads, "frontier", |&(p, g)| {
        run_ladder(ladder, &order, &run_cfg(p, Some(g)), progress)
    })?;
    let mut frontiers: Vec<Vec<FrontierPoint>> = vec![Vec::new(); cfg.policies.len()];
    for (&(p, g), r) in jobs.iter().zip(results) {
        frontiers[p].push(FrontierPoint {
            target_share: grid[g],
            top_share: r.top_share(),
            quality: r.tally.quality(),
            cost_usd: micros_to_usd(r.tally.ledger.total_micros()),
            answered: r.answered_shares(),
        });
    }

    // Operating points one at a time, so decision times are not measured under contention.
    let mut rows = Vec::with_capacity(cfg.policies.len());
    for (p, spec) in cfg.policies.iter().enumerate() {
        let r = run_ladder(ladder, &order, &run_cfg(p, None), progress)?;
        let frontier = std::mem::take(&mut frontiers[p]);
        let curve = Curve::new(
            frontier
                .iter()
                .map(|f| CurvePoint {
                    share: f.top_share,
                    quality: f.quality,
                })
                .collect(),
        );
        let (p50, p99) = decision_us(&r.tally.decision_ns);
        rows.push(LadderRow {
            name: spec.name().to_string(),
            feedback: spec.feedback.as_str().to_string(),
            quality: r.tally.quality(),
            top_share: r.top_share(),
            answered: r.answered_shares(),
            cost_usd: micros_to_usd(r.tally.ledger.total_micros()),
            capped: r.tally.capped,
            apgr: (!frontier.is_empty())
                .then(|| curve.apgr(q_low, q_top, cfg.grid))
                .flatten(),
            decision_us_p50: p50,
            decision_us_p99: p99,
            off_target: !frontier.is_empty() && off_target(r.top_share(), cfg.target_share),
            frontier,
        });
    }
    Ok(LadderReport {
        data: data.path.display().to_string(),
        items: order.len(),
        skipped_lines: data.skipped.len(),
        models,
        seed: cfg.seed,
        target_share: cfg.target_share,
        explore: cfg.explore,
        grid: cfg.grid,
        max_top_calls: cfg.budget.max_calls,
        max_usd: cfg.budget.max_micros.map(micros_to_usd),
        policies: rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::LoadOptions;
    use std::path::Path;

    fn data(text: &str) -> Arc<Dataset> {
        Arc::new(
            Dataset::parse(
                Path::new("t.jsonl"),
                text.as_bytes(),
                &LoadOptions::default(),
            )
            .unwrap(),
        )
    }

    fn price(s: &str) -> Price {
        Price::parse(s).unwrap()
    }

    const THREE: &str = r#"{"id":"a","prompt":"p","correct":{"big":true,"mid":true,"small":false},"cost":{"mid":0.001}}
{"id":"b","prompt":"q","correct":{"big":true,"mid":false,"small":true},"cost":{"mid":0.001}}"#;

    /// THREE's models with big and small priced (mid's costs are recorded).
    fn three_ladder() -> Ladder {
        Ladder::new(
            data(THREE),
            &[],
            &[
                ("big".into(), price("call:0.01")),
                ("small".into(), price("call:0.0001")),
            ],
            1,
        )
        .unwrap()
    }

    #[test]
    fn orders_models_by_cost_and_takes_recorded_costs() {
        let l = three_ladder();
        assert_eq!(l.names(), vec!["small", "mid", "big"]);
    }

    #[test]
    fn a_model_without_a_price_or_an_unknown_one_is_named() {
        let ds = data(THREE);
        let e = Ladder::new(ds.clone(), &[], &[("big".into(), price("call:1"))], 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("t.jsonl: model \"small\" has no price"),
            "{e}"
        );
        assert!(
            e.contains("`cost.small`") && e.contains("--price small="),
            "{e}"
        );
        let e = Ladder::new(ds.clone(), &[], &[("huge".into(), price("call:1"))], 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--price names model \"huge\""), "{e}");
        let e = Ladder::new(ds.clone(), &["mid".into()], &[], 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least two models; 1 given"), "{e}");
        let e = Ladder::new(ds.clone(), &["mid".into(), "nope".into()], &[], 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model \"nope\" is not in the file"), "{e}");
        // Every unpriced model is named at once; a price twice, or for a model whose costs are
        // recorded, is refused rather than silently dropped.
        let e = Ladder::new(ds.clone(), &[], &[], 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("models \"big\", \"small\" have no price"), "{e}");
        let twice = [
            ("big".into(), price("call:1")),
            ("big".into(), price("call:2")),
        ];
        let e = Ladder::new(ds.clone(), &[], &twice, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--price names model \"big\" twice"), "{e}");
        let recorded = [("mid".into(), price("call:1"))];
        let e = Ladder::new(ds, &[], &recorded, 1).unwrap_err().to_string();
        assert!(
            e.contains("records what each of \"mid\"'s answers cost"),
            "{e}"
        );
    }

    #[test]
    fn the_oracle_answers_at_the_cheapest_right_tier() {
        let l = three_ladder();
        let cfg = LadderRunConfig {
            spec: LadderSpec {
                policy: LadderPolicy::Oracle,
                feedback: FeedbackMode::None,
            },
            target_share: 0.0,
            explore: 0.0,
            seed: 0,
            budget: BudgetLimits::default(),
            time_decisions: false,
        };
        let r = run_ladder(&l, &[0, 1], &cfg, &|_| {}).unwrap();
        assert_eq!(r.tally.score, 2.0);
        // a: mid (small is wrong); b: small.
        assert_eq!(r.answered, vec![1, 1, 0]);
        assert_eq!(r.tally.ledger.total_micros(), 1000 + 100);
    }
}
