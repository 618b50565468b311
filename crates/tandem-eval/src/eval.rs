//! `tandem eval`: every policy over the same shuffled stream, side by side. Each learned policy is
//! run once per share on a grid (each run a real online pass holding that share), which gives its
//! quality/share curve and RouteLLM's metrics; then once more at the operating share, alone on the
//! machine, to time its decisions.

use crate::error::EvalError;
use crate::report::{off_target, CostPoint, EvalReport, PolicyRow};
use crate::runner::{run, Models, PolicyKind, RunConfig};
use crate::sweep::{decision_us, in_parallel, run_seed, share_grid, stream_order, Sweep};
use tandem_core::metrics::{Curve, CurvePoint};
use tandem_core::money::micros_to_usd;
use tandem_core::policy::cascade::CascadeConfig;
use tandem_core::policy::router::RouterConfig;
use tandem_core::policy::FeedbackMode;
use tandem_core::BudgetLimits;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicySpec {
    pub kind: PolicyKind,
    pub feedback: FeedbackMode,
}

impl PolicySpec {
    pub fn name(&self) -> &'static str {
        match self.kind {
            PolicyKind::AlwaysWeak => "always-weak",
            PolicyKind::AlwaysStrong => "always-strong",
            PolicyKind::Random => "random",
            PolicyKind::Oracle => "oracle",
            PolicyKind::Router => "router",
            PolicyKind::Cascade => "cascade",
        }
    }

    fn has_curve(&self) -> bool {
        !matches!(self.kind, PolicyKind::AlwaysWeak | PolicyKind::AlwaysStrong)
    }
}

/// The baselines, then each tandem policy the data allows, in both feedback modes.
pub fn default_policies(has_weak_responses: bool) -> Vec<PolicySpec> {
    let none = FeedbackMode::None;
    let mut v = vec![
        PolicySpec {
            kind: PolicyKind::AlwaysWeak,
            feedback: none,
        },
        PolicySpec {
            kind: PolicyKind::AlwaysStrong,
            feedback: none,
        },
        PolicySpec {
            kind: PolicyKind::Random,
            feedback: none,
        },
        PolicySpec {
            kind: PolicyKind::Oracle,
            feedback: none,
        },
    ];
    let mut learned = vec![PolicyKind::Router];
    if has_weak_responses {
        learned.push(PolicyKind::Cascade);
    }
    for kind in learned {
        for feedback in [FeedbackMode::Full, FeedbackMode::Partial] {
            v.push(PolicySpec { kind, feedback });
        }
    }
    v
}

#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub seed: u64,
    /// The operating point reported in the table's quality, share and cost columns.
    pub target_share: f64,
    /// Exploration rate of partial-feedback runs.
    pub explore: f64,
    /// Number of shares in [0, 1] the curves are measured at.
    pub grid: usize,
    pub window: usize,
    pub budget: BudgetLimits,
    pub threads: usize,
    pub limit: Option<usize>,
    pub policies: Vec<PolicySpec>,
    pub router: RouterConfig,
    pub cascade: CascadeConfig,
    /// A router (and cascade scorer) trained beforehand: the learned policies start from it
    /// (with its feature configuration) instead of from nothing, and keep learning.
    pub prior: Option<std::sync::Arc<tandem_core::prior::Prior>>,
    /// The router's weight on price (0: quality gain alone, 1: gain per dollar).
    pub cost_weight: f32,
    /// Sentence vectors of the prompts and the weak answers (e.g. MiniLM's, computed once by
    /// the caller): the router reads the prompts', the cascade scorer both, beside their
    /// n-grams, and each mixes in a kNN estimate.
    pub embedder: Option<std::sync::Arc<dyn tandem_core::embed::Embedder>>,
}

impl EvalConfig {
    pub fn validate(&self) -> Result<(), EvalError> {
        if !(0.0..=1.0).contains(&self.cost_weight) {
            return Err(EvalError::Invalid(format!(
                "--cost-weight {}: must be between 0 (quality gain alone) and 1 (gain per dollar)",
                self.cost_weight
            )));
        }
        self.sweep().validate()
    }

    fn sweep(&self) -> Sweep {
        Sweep {
            target_share: self.target_share,
            explore: self.explore,
            explore_max: 0.5,
            grid: self.grid,
            limit: self.limit,
            policies: self.policies.len(),
            budget: self.budget,
        }
    }
}

struct Job {
    policy: usize,
    /// Grid index, or None for the operating point.
    point: Option<usize>,
}

pub fn evaluate(
    models: &Models,
    cfg: &EvalConfig,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<EvalReport, EvalError> {
    cfg.validate()?;
    let data = &models.data;
    let order = stream_order(data.rows.len(), cfg.seed, cfg.limit);
    let n = order.len() as f64;
    let mean = |m: usize| {
        order
            .iter()
            .map(|&i| f64::from(data.rows[i].quality[m]))
            .sum::<f64>()
            / n
    };
    let (q_weak, q_strong) = (mean(models.weak), mean(models.strong));

    let grid = share_grid(cfg.grid);
    let curve_jobs: Vec<Job> = cfg
        .policies
        .iter()
        .enumerate()
        .filter(|(_, p)| p.has_curve())
        .flat_map(|(policy, _)| {
            (0..grid.len()).map(move |g| Job {
                policy,
                point: Some(g),
            })
        })
        .collect();
    let run_cfg = |job: &Job| {
        let spec = cfg.policies[job.policy];
        RunConfig {
            kind: spec.kind,
            feedback: spec.feedback,
            target_share: job.point.map_or(cfg.target_share, |g| grid[g]),
            explore: cfg.explore,
            window: cfg.window,
            seed: run_seed(cfg.seed, job.point.unwrap_or(usize::MAX - 1)),
            budget: cfg.budget,
            router: cfg.router,
            cascade: cfg.cascade,
            prior: cfg.prior.clone(),
            cost_weight: cfg.cost_weight,
            embedder: cfg.embedder.clone(),
            time_decisions: job.point.is_none(),
        }
    };

    // Curve runs in parallel: results depend only on each run's own seed.
    let results = in_parallel(&curve_jobs, cfg.threads, "curve", |job| {
        run(models, &order, &run_cfg(job), progress)
    })?;
    let mut curves: Vec<Vec<CurvePoint>> = vec![Vec::new(); cfg.policies.len()];
    let mut cost_curves: Vec<Vec<CostPoint>> = vec![Vec::new(); cfg.policies.len()];
    for (job, r) in curve_jobs.iter().zip(results) {
        curves[job.policy].push(CurvePoint {
            share: r.strong_share(),
            quality: r.tally.quality(),
        });
        cost_curves[job.policy].push(CostPoint {
            cost_usd: micros_to_usd(r.tally.ledger.total_micros()),
            quality: r.tally.quality(),
        });
    }
    // Each model alone, for APGR over cost: the dollars between the weak model's spend and the
    // strong model's.
    let alone = |kind: PolicyKind| {
        let job = Job {
            policy: 0,
            point: None,
        };
        run(
            models,
            &order,
            &RunConfig {
                kind,
                time_decisions: false,
                // What each model alone would spend, uncapped.
                budget: BudgetLimits::default(),
                ..run_cfg(&job)
            },
            &|_| {},
        )
        .map(|r| micros_to_usd(r.tally.ledger.total_micros()))
    };
    let cost_span = if curve_jobs.is_empty() {
        None
    } else {
        Some((
            alone(PolicyKind::AlwaysWeak)?,
            alone(PolicyKind::AlwaysStrong)?,
        ))
    };

    // Operating points one at a time, so decision times are not measured under contention.
    let mut rows = Vec::with_capacity(cfg.policies.len());
    for (p, spec) in cfg.policies.iter().enumerate() {
        let mut r = run(
            models,
            &order,
            &run_cfg(&Job {
                policy: p,
                point: None,
            }),
            progress,
        )?;
        let curve = spec
            .has_curve()
            .then(|| Curve::new(std::mem::take(&mut curves[p])));
        let (p50, p99) = decision_us(&r.tally.decision_ns);
        let by_cost = std::mem::take(&mut cost_curves[p]);
        let apgr_cost = match (&curve, cost_span) {
            (Some(_), Some((c_weak, c_strong))) => {
                apgr_over_cost(&by_cost, c_weak, c_strong, q_weak, q_strong, cfg.grid)
            }
            _ => None,
        };
        rows.push(PolicyRow {
            name: spec.name().to_string(),
            feedback: spec.feedback.as_str().to_string(),
            quality: r.tally.quality(),
            strong_share: r.strong_share(),
            explore_share: r.both_calls as f64 / r.tally.items.max(1) as f64,
            cost_usd: micros_to_usd(r.tally.ledger.total_micros()),
            capped: r.tally.capped,
            apgr: curve
                .as_ref()
                .and_then(|c| c.apgr(q_weak, q_strong, cfg.grid)),
            apgr_cost,
            cpt50: curve.as_ref().and_then(|c| c.cpt(0.5, q_weak, q_strong)),
            cpt80: curve.as_ref().and_then(|c| c.cpt(0.8, q_weak, q_strong)),
            decision_us_p50: p50,
            decision_us_p99: p99,
            off_target: spec.has_curve() && off_target(r.strong_share(), cfg.target_share),
            curve: curve.map(|c| c.points().to_vec()).unwrap_or_default(),
            curve_cost: by_cost,
        });
        r.tally.decision_ns.clear();
    }
    Ok(EvalReport {
        data: data.path.display().to_string(),
        items: order.len(),
        skipped_lines: data.skipped.len(),
        weak: data.models[models.weak].clone(),
        strong: data.models[models.strong].clone(),
        q_weak,
        q_strong,
        seed: cfg.seed,
        target_share: cfg.target_share,
        explore: cfg.explore,
        grid: cfg.grid,
        max_strong_calls: cfg.budget.max_calls,
        max_usd: cfg.budget.max_micros.map(micros_to_usd),
        // Said only where the file carries metadata for it to read (GSM8K's records have none).
        router_metadata: cfg
            .prior
            .as_ref()
            .and_then(|p| p.router.as_ref())
            .map_or(cfg.router.use_metadata, |r| r.config().use_metadata)
            && data.rows.iter().any(|r| !r.query.metadata.is_empty()),
        router_vectors: cfg.embedder.as_ref().map(|e| e.name().to_string()),
        prior_trained_on: cfg
            .prior
            .as_ref()
            .map(|p| p.info.trained_on.iter().map(|t| t.file.clone()).collect()),
        cost_weight: cfg.cost_weight,
        cost_weak_usd: cost_span.map(|c| c.0),
        cost_strong_usd: cost_span.map(|c| c.1),
        policies: rows,
    })
}

/// APGR over cost: the mean PGR over `grid` evenly spaced dollar amounts from the weak model's
/// spend alone (`c_weak`) to the strong model's (`c_strong`), quality linear between the measured
/// (cost, quality) points and flat beyond them. A router that buys its quality with cheaper
/// escalations scores higher here than on APGR over share. `None` unless the strong model alone
/// spends more than the weak one (there is no gap to buy back with dollars).
pub fn apgr_over_cost(
    points: &[CostPoint],
    c_weak: f64,
    c_strong: f64,
    q_weak: f64,
    q_strong: f64,
    grid: usize,
) -> Option<f64> {
    let span = c_strong - c_weak;
    if span <= 1e-12 {
        return None;
    }
    Curve::new(
        points
            .iter()
            .map(|p| CurvePoint {
                share: (p.cost_usd - c_weak) / span,
                quality: p.quality,
            })
            .collect(),
    )
    .apgr(q_weak, q_strong, grid)
}

/// How many items all runs of `evaluate` will process, for a progress bar.
pub fn total_work(cfg: &EvalConfig, items: usize) -> u64 {
    let curves = cfg.policies.iter().filter(|p| p.has_curve()).count();
    cfg.sweep().work(items, curves)
}

#[cfg(test)]
mod cost_tests {
    use super::*;

    fn pts(v: &[(f64, f64)]) -> Vec<CostPoint> {
        v.iter()
            .map(|&(cost_usd, quality)| CostPoint { cost_usd, quality })
            .collect()
    }

    #[test]
    fn apgr_over_cost_rewards_cheap_quality() {
        // Quality rising with dollars in a straight line: half the gap on average.
        let line = pts(&[(1.0, 0.6), (6.0, 0.7), (11.0, 0.8)]);
        let a = apgr_over_cost(&line, 1.0, 11.0, 0.6, 0.8, 11).unwrap();
        assert!((a - 0.5).abs() < 1e-9, "{a}");
        // The strong model's quality for a fifth of its extra dollars: most of the area.
        let cheap = pts(&[(1.0, 0.6), (3.0, 0.8), (11.0, 0.8)]);
        let b = apgr_over_cost(&cheap, 1.0, 11.0, 0.6, 0.8, 11).unwrap();
        assert!(b > 0.85, "{b}");
        // Models that cost the same: no span to measure over.
        assert!(apgr_over_cost(&line, 2.0, 2.0, 0.6, 0.8, 11).is_none());
        // A strong model cheaper than the weak one: no dollars to trade for quality.
        assert!(apgr_over_cost(&line, 11.0, 1.0, 0.6, 0.8, 11).is_none());
    }
}
