//! What `tandem eval` does alike for two models and for a cascade of N: it checks the settings,
//! shuffles the stream, lays the grid of shares, runs the grid's runs on worker threads, and
//! summarises the operating point's decision times.

use crate::error::EvalError;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use tandem_core::stats::percentile;
use tandem_core::BudgetLimits;

/// The fewest and most shares a curve is measured at (`--grid`).
pub const MIN_GRID: usize = 3;
pub const MAX_GRID: usize = 201;

/// The settings both evals hold, as their configs give them.
pub(crate) struct Sweep {
    pub(crate) target_share: f64,
    pub(crate) explore: f64,
    /// The largest exploration rate the eval allows.
    pub(crate) explore_max: f64,
    pub(crate) grid: usize,
    pub(crate) limit: Option<usize>,
    pub(crate) policies: usize,
    pub(crate) budget: BudgetLimits,
}

impl Sweep {
    pub(crate) fn validate(&self) -> Result<(), EvalError> {
        let bad = |m: String| Err(EvalError::Invalid(m));
        if !(0.0..=1.0).contains(&self.target_share) {
            return bad(format!(
                "--target-share {}: must be between 0 and 1",
                self.target_share
            ));
        }
        if !(0.0..=self.explore_max).contains(&self.explore) {
            return bad(format!(
                "--explore {}: must be between 0 and {}",
                self.explore, self.explore_max
            ));
        }
        // Two points are 0% and 100% alone: every curve joins the models' own qualities and
        // every policy scores APGR 0.5, so a curve needs a share in between.
        if !(MIN_GRID..=MAX_GRID).contains(&self.grid) {
            return bad(format!(
                "--grid {}: must be between {MIN_GRID} and {MAX_GRID} (a curve needs a share between 0% and 100%)",
                self.grid
            ));
        }
        if self.limit == Some(0) {
            return bad("--limit 0: nothing to evaluate".into());
        }
        if self.policies == 0 {
            return bad("no policies to evaluate".into());
        }
        self.budget.validate()?;
        Ok(())
    }

    /// How many items all runs process when `curves` of the policies run once per share of the
    /// grid and every policy once more at the operating point, for a progress bar.
    pub(crate) fn work(&self, items: usize, curves: usize) -> u64 {
        let n = self.limit.map_or(items, |l| l.min(items)) as u64;
        n * (curves as u64 * self.grid as u64 + self.policies as u64)
    }
}

/// A deterministic per-run seed, so each run's randomness is independent of scheduling.
pub(crate) fn run_seed(seed: u64, point: usize) -> u64 {
    let mut z = seed.wrapping_add((point as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 27)
}

/// The stream every run of an eval replays: the row indices shuffled by `seed`, cut to `limit`
/// (for a seed, the same stream whatever the number of models).
pub fn stream_order(rows: usize, seed: u64, limit: Option<usize>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    if let Some(limit) = limit {
        order.truncate(limit);
    }
    order
}

/// `n` (at least [`MIN_GRID`]) shares evenly spaced from 0 to 1.
pub(crate) fn share_grid(n: usize) -> Vec<f64> {
    (0..n).map(|i| i as f64 / (n - 1) as f64).collect()
}

/// Runs every job on `threads` workers and returns the results in job order; the first error in
/// that order stands. The runs may go in parallel because each depends only on its own seed.
/// `what` names a run in the error for one that never finished.
pub(crate) fn in_parallel<J: Sync, R: Send>(
    jobs: &[J],
    threads: usize,
    what: &str,
    run: impl Fn(&J) -> Result<R, EvalError> + Sync,
) -> Result<Vec<R>, EvalError> {
    let results: Mutex<Vec<Option<Result<R, EvalError>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(j) else { break };
                let r = run(job);
                if let Ok(mut res) = results.lock() {
                    res[j] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .map_err(|_| EvalError::Invalid("a worker thread panicked".into()))?
        .into_iter()
        .map(|r| r.ok_or_else(|| EvalError::Invalid(format!("a {what} run did not finish")))?)
        .collect()
}

/// The median and 99th percentile of decision times given in nanoseconds, in microseconds (0
/// when there are none).
pub(crate) fn decision_us(ns: &[u64]) -> (f64, f64) {
    let mut us: Vec<f64> = ns.iter().map(|&ns| ns as f64 / 1000.0).collect();
    (
        percentile(&mut us, 50.0).unwrap_or(0.0),
        percentile(&mut us, 99.0).unwrap_or(0.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(grid: usize) -> Sweep {
        Sweep {
            target_share: 0.3,
            explore: 0.1,
            explore_max: 1.0,
            grid,
            limit: None,
            policies: 1,
            budget: BudgetLimits::default(),
        }
    }

    #[test]
    fn a_grid_needs_a_share_between_the_ends() {
        for grid in [0, 1, 2, 202, 1000] {
            let e = sweep(grid).validate().err().map(|e| e.to_string());
            let e = e.unwrap_or_default();
            assert!(
                e.contains(&format!("--grid {grid}: must be between 3 and 201")),
                "{grid}: {e:?}"
            );
        }
        for grid in [3, 5, 21, 201] {
            assert!(sweep(grid).validate().is_ok(), "{grid}");
            assert_eq!(share_grid(grid).len(), grid);
        }
    }
}
