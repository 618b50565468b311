//! `tandem eval`: every policy over the same shuffled stream, side by side. Each learned policy is
//! run once per share on a grid (each run a real online pass holding that share), which gives its
//! quality/share curve and RouteLLM's metrics; then once more at the operating share, alone on the
//! machine, to time its decisions.

use crate::error::EvalError;
use crate::report::{EvalReport, PolicyRow};
use crate::runner::{run, Models, PolicyKind, RunConfig, RunOutcome};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use tandem_core::metrics::{Curve, CurvePoint};
use tandem_core::money::micros_to_usd;
use tandem_core::policy::cascade::CascadeConfig;
use tandem_core::policy::router::RouterConfig;
use tandem_core::policy::FeedbackMode;
use tandem_core::stats::percentile;
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
}

impl EvalConfig {
    pub fn validate(&self) -> Result<(), EvalError> {
        let bad = |m: String| Err(EvalError::Invalid(m));
        if !(0.0..=1.0).contains(&self.target_share) {
            return bad(format!(
                "--target-share {}: must be between 0 and 1",
                self.target_share
            ));
        }
        if !(0.0..=0.5).contains(&self.explore) {
            return bad(format!(
                "--explore {}: must be between 0 and 0.5",
                self.explore
            ));
        }
        if !(2..=201).contains(&self.grid) {
            return bad(format!("--grid {}: must be between 2 and 201", self.grid));
        }
        if self.limit == Some(0) {
            return bad("--limit 0: nothing to evaluate".into());
        }
        if self.policies.is_empty() {
            return bad("no policies to evaluate".into());
        }
        self.budget.validate()?;
        Ok(())
    }
}

/// A deterministic per-run seed, so each run's randomness is independent of scheduling.
pub(crate) fn run_seed(seed: u64, point: usize) -> u64 {
    let mut z = seed.wrapping_add((point as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 27)
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
    let mut order: Vec<usize> = (0..data.rows.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed));
    if let Some(limit) = cfg.limit {
        order.truncate(limit);
    }
    let n = order.len() as f64;
    let q_weak = order
        .iter()
        .filter(|&&i| data.rows[i].correct[models.weak])
        .count() as f64
        / n;
    let q_strong = order
        .iter()
        .filter(|&&i| data.rows[i].correct[models.strong])
        .count() as f64
        / n;

    let grid: Vec<f64> = (0..cfg.grid)
        .map(|i| i as f64 / (cfg.grid - 1) as f64)
        .collect();
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
            time_decisions: job.point.is_none(),
        }
    };

    // Curve runs in parallel: results depend only on each run's own seed.
    let results: Mutex<Vec<Option<Result<RunOutcome, EvalError>>>> =
        Mutex::new((0..curve_jobs.len()).map(|_| None).collect());
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..cfg.threads.max(1) {
            s.spawn(|| loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = curve_jobs.get(j) else { break };
                let r = run(models, &order, &run_cfg(job), progress);
                if let Ok(mut res) = results.lock() {
                    res[j] = Some(r);
                }
            });
        }
    });
    let results = results
        .into_inner()
        .map_err(|_| EvalError::Invalid("a worker thread panicked".into()))?;
    let mut curves: Vec<Vec<CurvePoint>> = vec![Vec::new(); cfg.policies.len()];
    for (job, r) in curve_jobs.iter().zip(results) {
        let r = r.ok_or_else(|| EvalError::Invalid("a curve run did not finish".into()))??;
        curves[job.policy].push(CurvePoint {
            share: r.strong_share(),
            quality: r.quality(),
        });
    }

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
        let mut us: Vec<f64> = r.decision_ns.iter().map(|&ns| ns as f64 / 1000.0).collect();
        rows.push(PolicyRow {
            name: spec.name().to_string(),
            feedback: spec.feedback.as_str().to_string(),
            quality: r.quality(),
            strong_share: r.strong_share(),
            explore_share: r.both_calls as f64 / r.items.max(1) as f64,
            cost_usd: micros_to_usd(r.ledger.total_micros()),
            capped: r.capped,
            apgr: curve
                .as_ref()
                .and_then(|c| c.apgr(q_weak, q_strong, cfg.grid)),
            cpt50: curve.as_ref().and_then(|c| c.cpt(0.5, q_weak, q_strong)),
            cpt80: curve.as_ref().and_then(|c| c.cpt(0.8, q_weak, q_strong)),
            decision_us_p50: percentile(&mut us, 50.0).unwrap_or(0.0),
            decision_us_p99: percentile(&mut us, 99.0).unwrap_or(0.0),
            curve: curve.map(|c| c.points().to_vec()).unwrap_or_default(),
        });
        r.decision_ns.clear();
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
        policies: rows,
    })
}

/// How many items all runs of `evaluate` will process, for a progress bar.
pub fn total_work(cfg: &EvalConfig, items: usize) -> u64 {
    let n = cfg.limit.map_or(items, |l| l.min(items)) as u64;
    let curves = cfg.policies.iter().filter(|p| p.has_curve()).count() as u64;
    n * (curves * cfg.grid as u64 + cfg.policies.len() as u64)
}
