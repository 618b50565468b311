//! Holding a target share of expensive calls on a live stream. The threshold is the quantile of the
//! recent scores that would send the target share up, corrected by how far the realised share has
//! drifted from the target so far. Only past scores are used: nothing peeks ahead in the stream.

use crate::error::CoreError;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShareController {
    target: f64,
    window: usize,
    /// Scores in arrival order (to evict the oldest) and sorted (to read quantiles).
    recent: VecDeque<f32>,
    sorted: Vec<f32>,
    /// How many decisions ahead the accumulated deviation is corrected over.
    horizon: f64,
    decisions: u64,
    escalations: u64,
}

/// What the controller decided for one score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShareDecision {
    pub escalate: bool,
    pub threshold: f32,
}

impl ShareController {
    pub fn new(target: f64, window: usize) -> Result<Self, CoreError> {
        if !(0.0..=1.0).contains(&target) {
            return Err(CoreError::config(
                "target_share",
                target,
                "must be between 0 and 1",
            ));
        }
        if window < 10 {
            return Err(CoreError::config("window", window, "must be at least 10"));
        }
        Ok(ShareController {
            target,
            window,
            recent: VecDeque::with_capacity(window),
            sorted: Vec::with_capacity(window),
            horizon: 200.0,
            decisions: 0,
            escalations: 0,
        })
    }

    pub fn target(&self) -> f64 {
        self.target
    }

    pub fn set_target(&mut self, target: f64) {
        self.target = target.clamp(0.0, 1.0);
    }

    pub fn realised_share(&self) -> f64 {
        if self.decisions == 0 {
            0.0
        } else {
            self.escalations as f64 / self.decisions as f64
        }
    }

    /// The share to aim for on the next decision: the target plus a correction for the deficit
    /// (or surplus) of escalations accumulated so far, spread over `horizon` decisions.
    /// `base` is the part of the target this controller is responsible for (the target less
    /// what exploration already spends).
    fn level(&self, base: f64) -> f64 {
        let deficit = self.target * self.decisions as f64 - self.escalations as f64;
        (base + deficit / self.horizon).clamp(0.0, 1.0)
    }

    /// Decides whether `score` escalates. `base` is the share this controller should send up on its
    /// own (usually the target; less when exploration spends part of it). `tie_break` in [0,1) is a
    /// random draw used only when the score equals the threshold, e.g. while all scores are equal
    /// before anything has been learned.
    pub fn decide(&self, score: f32, base: f64, tie_break: f64) -> ShareDecision {
        let level = self.level(base);
        if level <= 0.0 {
            return ShareDecision {
                escalate: false,
                threshold: f32::INFINITY,
            };
        }
        if level >= 1.0 {
            return ShareDecision {
                escalate: true,
                threshold: f32::NEG_INFINITY,
            };
        }
        if self.sorted.len() < 10 {
            // Nothing to take a quantile of yet: escalate at random at the wanted rate.
            return ShareDecision {
                escalate: tie_break < level,
                threshold: f32::NAN,
            };
        }
        // The threshold is the score at quantile (1 - level) of the recent scores.
        let n = self.sorted.len();
        let pos = ((1.0 - level) * n as f64).floor() as usize;
        let threshold = self.sorted[pos.min(n - 1)];
        let escalate = if score > threshold {
            true
        } else if score < threshold {
            false
        } else {
            // Ties: escalate with the probability that splits the tied mass at the wanted level.
            let lo = self.sorted.partition_point(|&s| s < threshold);
            let hi = self.sorted.partition_point(|&s| s <= threshold);
            let above = (n - hi) as f64 / n as f64;
            let tied = (hi - lo) as f64 / n as f64;
            tie_break < ((level - above) / tied).clamp(0.0, 1.0)
        };
        ShareDecision {
            escalate,
            threshold,
        }
    }

    /// Records a decision that was made (escalated is what really happened, after budgets).
    pub fn record(&mut self, score: f32, escalated: bool) {
        self.decisions += 1;
        self.escalations += u64::from(escalated);
        if !score.is_finite() {
            return;
        }
        if self.recent.len() == self.window {
            if let Some(old) = self.recent.pop_front() {
                let i = self.sorted.partition_point(|&s| s < old);
                if i < self.sorted.len() {
                    self.sorted.remove(i);
                }
            }
        }
        self.recent.push_back(score);
        let i = self.sorted.partition_point(|&s| s < score);
        self.sorted.insert(i, score);
    }

    /// Records a decision that the controller did not take part in (an exploration call): it
    /// counts towards the realised share.
    pub fn record_external(&mut self, escalated: bool) {
        self.decisions += 1;
        self.escalations += u64::from(escalated);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn run(target: f64, scores: impl Iterator<Item = f32>) -> f64 {
        let mut c = ShareController::new(target, 500).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for s in scores {
            let d = c.decide(s, target, rng.gen());
            c.record(s, d.escalate);
        }
        c.realised_share()
    }

    #[test]
    fn holds_the_target_on_a_stationary_stream() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let scores: Vec<f32> = (0..5000).map(|_| rng.gen()).collect();
        for target in [0.1, 0.3, 0.5, 0.9] {
            let share = run(target, scores.iter().copied());
            assert!((share - target).abs() < 0.01, "target {target} got {share}");
        }
    }

    #[test]
    fn holds_the_target_when_scores_drift() {
        // Scores drift upwards through the stream: a fixed threshold would overshoot badly.
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let scores = (0..5000).map(move |i| rng.gen::<f32>() + i as f32 / 1000.0);
        let share = run(0.3, scores);
        assert!((share - 0.3).abs() < 0.02, "got {share}");
    }

    #[test]
    fn holds_the_target_when_all_scores_tie() {
        let share = run(0.25, std::iter::repeat_n(0.0, 4000));
        assert!((share - 0.25).abs() < 0.02, "got {share}");
    }

    #[test]
    fn extremes() {
        assert_eq!(run(0.0, (0..100).map(|i| i as f32)), 0.0);
        assert_eq!(run(1.0, (0..100).map(|i| i as f32)), 1.0);
        assert!(ShareController::new(1.5, 100).is_err());
        assert!(ShareController::new(0.5, 1).is_err());
    }
}
