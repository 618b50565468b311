//! One online pass of a policy over a recorded stream, through the core's cascade engine: the two
//! replay tiers are its tiers, the scorer and its gate its policy ([`Gated`]). For every item, in
//! stream order, the engine serves it (score, decide: share target, exploration, hard budget; call
//! the chosen replay tiers); then the outcomes are revealed according to the feedback mode and
//! the policy learns. Nothing a policy sees about an item depends on its outcome before its
//! decision is made.

use crate::data::{Dataset, Row};
use crate::error::EvalError;
use crate::replay::ReplayTier;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use tandem_core::engine::{Cascade, Hint, Reply, Served, Tiers};
use tandem_core::policy::cascade::{CascadeConfig, ResponseCascade};
use tandem_core::policy::gate::{Gate, GateConfig, Route};
use tandem_core::policy::gated::{Gated, Scorer};
use tandem_core::policy::router::{GainRouter, RouterConfig};
use tandem_core::policy::teaching::Teaching;
use tandem_core::policy::{FeedbackMode, Observation, RouteScorer};
use tandem_core::{Budget, BudgetLimits, Ledger, Micros, Output, Price, Query, Tier};

/// Which policy to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    AlwaysWeak,
    AlwaysStrong,
    /// Random routing at the target share.
    Random,
    /// Knows the outcomes: strong exactly where it gains. A reference, not a policy.
    Oracle,
    /// The learned route-before router.
    Router,
    /// The learned cascade-after policy (needs recorded weak responses).
    Cascade,
}

#[derive(Debug, Clone)]
pub struct Models {
    pub data: Arc<Dataset>,
    pub weak: usize,
    pub strong: usize,
    pub weak_price: Price,
    pub strong_price: Price,
    pub default_output_tokens: u64,
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub kind: PolicyKind,
    pub feedback: FeedbackMode,
    pub target_share: f64,
    pub explore: f64,
    pub window: usize,
    pub seed: u64,
    pub budget: BudgetLimits,
    pub router: RouterConfig,
    pub cascade: CascadeConfig,
    /// Where the learned policies start: a trained prior's models, else nothing.
    pub prior: Option<Arc<tandem_core::prior::Prior>>,
    /// The router's weight on the strong call's price: 0 the quality gain alone, 1 the gain
    /// per dollar ([`tandem_core::policy::cost`]).
    pub cost_weight: f32,
    /// Sentence vectors of the prompts (and the weak answers): the router and the cascade
    /// scorer read them beside their n-grams.
    pub embedder: Option<Arc<dyn tandem_core::embed::Embedder>>,
    /// Record the time of every decision (for the operating point; off on curve runs).
    pub time_decisions: bool,
}

/// The run's route-before router: the prior's, else a new one; reading the prompts' vectors
/// when the run has them (and, for a prior, when it was trained on them).
fn router_for(cfg: &RunConfig) -> Result<GainRouter, EvalError> {
    match (
        cfg.prior.as_ref().and_then(|p| p.router.clone()),
        &cfg.embedder,
    ) {
        (Some(r), Some(e)) if r.config().reads_embeddings() => Ok(r.with_embedder(e.clone())?),
        (Some(r), None) if r.config().reads_embeddings() => Err(EvalError::Invalid(
            "the prior's router reads sentence vectors, and this run has none".into(),
        )),
        (Some(r), _) => Ok(r),
        (None, Some(e)) => {
            Ok(GainRouter::new(cfg.router.with_embeddings(e.dim()))?.with_embedder(e.clone())?)
        }
        (None, None) => Ok(GainRouter::new(cfg.router)?),
    }
}

/// The run's cascade scorer: the prior's, else a new one; reading the prompts' and the weak
/// answers' vectors when the run has them (and, for a prior, when it was trained on them).
fn cascade_for(cfg: &RunConfig) -> Result<ResponseCascade, EvalError> {
    match (
        cfg.prior.as_ref().and_then(|p| p.cascade.clone()),
        &cfg.embedder,
    ) {
        (Some(c), Some(e)) if c.config().reads_embeddings() => Ok(c.with_embedder(e.clone())?),
        (Some(c), None) if c.config().reads_embeddings() => Err(EvalError::Invalid(
            "the prior's cascade scorer reads sentence vectors, and this run has none".into(),
        )),
        (Some(c), _) => Ok(c),
        (None, Some(e)) => {
            // Vector settings the caller chose are kept (e.g. kNN alone); else the defaults.
            let c = if cfg.cascade.reads_embeddings() {
                cfg.cascade
            } else {
                cfg.cascade.with_embeddings(e.dim())
            };
            Ok(ResponseCascade::new(c)?.with_embedder(e.clone())?)
        }
        (None, None) => Ok(ResponseCascade::new(cfg.cascade)?),
    }
}

/// What every replayed run counts, whatever its number of tiers.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub items: u64,
    /// The served answers' summed quality (each in [0, 1]: right or wrong, or a graded score).
    pub score: f64,
    /// Steps up (escalations) the policy wanted and the budget refused.
    pub capped: u64,
    pub ledger: Ledger,
    pub decision_ns: Vec<u64>,
}

impl Tally {
    pub fn quality(&self) -> f64 {
        self.score / self.items.max(1) as f64
    }
}

#[derive(Debug, Clone, Default)]
pub struct RunOutcome {
    pub tally: Tally,
    /// Queries on which the strong model was called (explorations included).
    pub strong_calls: u64,
    /// Explorations: both models called and paid.
    pub both_calls: u64,
}

impl RunOutcome {
    pub fn strong_share(&self) -> f64 {
        self.strong_calls as f64 / self.tally.items.max(1) as f64
    }
}

/// The stream and settings of one online pass, whatever its policy and tiers.
pub(crate) struct Pass<'a> {
    pub(crate) data: &'a Dataset,
    /// Indices into the rows, in stream order.
    pub(crate) order: &'a [usize],
    pub(crate) budget: BudgetLimits,
    pub(crate) time_decisions: bool,
    /// Told how many items were done, now and then.
    pub(crate) progress: &'a (dyn Fn(u64) + Sync),
}

impl Pass<'_> {
    /// Serves each item in turn through `cascade` over `tiers` and counts it; `settle` then
    /// counts what its run adds, sets each tier's outcome as the feedback mode reveals it (None:
    /// hidden) and says the served answer's quality in [0, 1]; the policy learns from the
    /// revealed outcomes before the next item.
    pub(crate) fn run(
        &self,
        cascade: &mut Cascade,
        tiers: &mut Replayed,
        mut settle: impl FnMut(&Row, &Served, &mut [Option<f32>]) -> f32,
    ) -> Result<Tally, EvalError> {
        let budget = Budget::new(self.budget)?;
        let mut out = Tally::default();
        if self.time_decisions {
            out.decision_ns.reserve(self.order.len());
        }
        let mut observed = vec![None; tiers.tiers.len()];
        for (done, &i) in self.order.iter().enumerate() {
            let row = self
                .data
                .rows
                .get(i)
                .ok_or_else(|| EvalError::Invalid(format!("row {i} out of range")))?;
            let (served, walk) = cascade.serve_walk(tiers, &budget, &row.query)?;
            if self.time_decisions {
                out.decision_ns.push(served.decision.as_nanos() as u64);
            }
            for c in &served.calls {
                if let Some(t) = tiers.tiers.get(c.tier) {
                    out.ledger.record(t.id(), c.cost, c.usage);
                }
            }
            out.capped += u64::from(served.refused);
            out.score += f64::from(settle(row, &served, &mut observed));
            out.items += 1;
            cascade.learn_outcomes(&walk, &row.query, &observed);
            if done % 512 == 511 {
                (self.progress)(512);
            }
        }
        (self.progress)((self.order.len() % 512) as u64);
        Ok(out)
    }
}

/// Replay tiers, cheapest first, as the engine's tiers (the weak and the strong one for two
/// models; the price-ordered ladder for N).
pub(crate) struct Replayed {
    pub(crate) tiers: Vec<ReplayTier>,
}

impl Tiers for Replayed {
    type Error = EvalError;

    fn count(&self) -> usize {
        self.tiers.len()
    }

    fn estimate(&mut self, tier: usize, query: &Query) -> Micros {
        self.tiers.get(tier).map_or(0, |t| t.estimate_cost(query))
    }

    fn warm(&mut self, _tier: usize) -> bool {
        true
    }

    fn updates(&mut self, _tier: usize) -> u64 {
        0
    }

    fn answer(&mut self, tier: usize, query: &Query, _: Option<Hint>) -> Result<Reply, EvalError> {
        let t = self
            .tiers
            .get_mut(tier)
            .ok_or_else(|| EvalError::Invalid(format!("no tier {tier}")))?;
        let a = t.answer(query)?;
        let text = match a.output {
            Output::Text { text, .. } => Some(text),
            Output::Label { .. } => None,
        };
        Ok(Reply {
            text,
            usage: a.usage,
            cost: a.cost,
            compute: a.compute,
            ..Reply::classes(Vec::new(), Vec::new())
        })
    }

    /// Replayed answers do not learn.
    fn learn(&mut self, _: usize, _: &str, _: usize, _: f32) -> Result<(), EvalError> {
        Ok(())
    }
}

/// Scores uniformly at random: with the gate, random routing at the target share.
struct RandomScorer(ChaCha8Rng);

impl RouteScorer for RandomScorer {
    fn score(&mut self, _: &Query) -> f32 {
        self.0.gen()
    }
    fn learn(&mut self, _: &Query, _: &Observation) {}
}

/// Peeks at the outcomes: +1 where only the strong model is right, −1 where only the weak one is.
struct OracleScorer {
    data: Arc<Dataset>,
    weak: usize,
    strong: usize,
}

impl RouteScorer for OracleScorer {
    fn score(&mut self, q: &Query) -> f32 {
        self.data
            .row_of(&q.id)
            .map_or(0.0, |r| r.quality[self.strong] - r.quality[self.weak])
    }
    fn learn(&mut self, _: &Query, _: &Observation) {}
}

struct Constant;

impl RouteScorer for Constant {
    fn score(&mut self, _: &Query) -> f32 {
        0.0
    }
    fn learn(&mut self, _: &Query, _: &Observation) {}
}

/// A revealed outcome: the answer's quality in [0, 1].
pub(crate) fn outcome(quality: f32) -> Option<f32> {
    Some(quality)
}

/// Runs `cfg.kind` over `order` (indices into the dataset's rows). `progress` is told how many
/// items were done, now and then.
pub fn run(
    models: &Models,
    order: &[usize],
    cfg: &RunConfig,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<RunOutcome, EvalError> {
    let data = &models.data;
    let weak = ReplayTier::new(
        data.clone(),
        models.weak,
        models.weak_price,
        models.default_output_tokens,
    )?;
    let strong = ReplayTier::new(
        data.clone(),
        models.strong,
        models.strong_price,
        models.default_output_tokens,
    )?;
    let target = match cfg.kind {
        PolicyKind::AlwaysWeak => 0.0,
        PolicyKind::AlwaysStrong => 1.0,
        _ => cfg.target_share,
    };
    let explore = match cfg.feedback {
        FeedbackMode::Partial => cfg.explore,
        _ => 0.0,
    };
    let gate = Gate::new(GateConfig {
        target_share: target,
        explore,
        window: cfg.window,
        seed: cfg.seed,
    })?;
    let scorer = match cfg.kind {
        PolicyKind::AlwaysWeak | PolicyKind::AlwaysStrong => Scorer::Route(Box::new(Constant)),
        PolicyKind::Random => Scorer::Route(Box::new(RandomScorer(ChaCha8Rng::seed_from_u64(
            cfg.seed ^ 0x5eed,
        )))),
        PolicyKind::Oracle => Scorer::Route(Box::new(OracleScorer {
            data: data.clone(),
            weak: models.weak,
            strong: models.strong,
        })),
        PolicyKind::Router => {
            let router: Box<dyn RouteScorer> = Box::new(router_for(cfg)?);
            Scorer::Route(if cfg.cost_weight > 0.0 {
                Box::new(tandem_core::policy::cost::CostAware::new(
                    router,
                    models.strong_price,
                    models.default_output_tokens,
                    cfg.cost_weight,
                ))
            } else {
                router
            })
        }
        PolicyKind::Cascade => {
            if !data.has_responses(models.weak) {
                return Err(EvalError::Invalid(format!(
                    "the cascade policy needs the weak model's recorded responses; {} has none for {}",
                    data.path.display(),
                    data.models[models.weak]
                )));
            }
            Scorer::Cascade(Box::new(cascade_for(cfg)?))
        }
    };
    // Two tiers, the strong one metered by the budget; the replayed tiers teach nobody.
    let mut cascade = Cascade::new(2, Box::new(Gated::new(scorer, gate)), Teaching::default())?;
    let mut tiers = Replayed {
        tiers: vec![weak, strong],
    };

    let pass = Pass {
        data,
        order,
        budget: cfg.budget,
        time_decisions: cfg.time_decisions,
        progress,
    };
    let (mut strong_calls, mut both_calls) = (0, 0);
    let tally = pass.run(&mut cascade, &mut tiers, |row, served, observed| {
        let (w_ok, s_ok) = (row.quality[models.weak], row.quality[models.strong]);
        let strong_called = served.calls.iter().any(|c| c.tier == 1);
        let route = match (strong_called, served.explored) {
            (false, _) => Route::Weak,
            (true, false) => Route::Strong,
            (true, true) => Route::Both,
        };
        strong_calls += u64::from(strong_called);
        both_calls += u64::from(route == Route::Both);
        let revealed = match (cfg.feedback, route) {
            (FeedbackMode::None, _) => Observation::default(),
            (FeedbackMode::Full, _) | (FeedbackMode::Partial, Route::Both) => Observation {
                weak: outcome(w_ok),
                strong: outcome(s_ok),
            },
            (FeedbackMode::Partial, Route::Weak) => Observation {
                weak: outcome(w_ok),
                strong: None,
            },
            (FeedbackMode::Partial, Route::Strong) => Observation {
                weak: None,
                strong: outcome(s_ok),
            },
        };
        for (o, r) in observed.iter_mut().zip([revealed.weak, revealed.strong]) {
            *o = r;
        }
        if route == Route::Weak {
            w_ok
        } else {
            s_ok
        }
    })?;
    Ok(RunOutcome {
        tally,
        strong_calls,
        both_calls,
    })
}
