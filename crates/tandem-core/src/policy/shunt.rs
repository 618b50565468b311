//! The confidence shunt of Data Shunt+ (DS+: Chen, Zhang et al., "Improving Large Models with
//! Small Models: Lower Costs and Better Performance", 2024, arXiv 2406.15471; its data shunt, the
//! part that routes by the small model's confidence): a cheap tier answers when its top class
//! probability reaches its threshold, otherwise the item goes up. [`ConfidenceShunt`] keeps one
//! fixed threshold per cheap tier; [`max_prob_gate`] holds one threshold for all of them so that a
//! target share of the items reaches the top tier (see [`super::held`]). DS+'s two teaching
//! directions, S4L and L4S, are the engine's teaching step ([`super::teaching`]).

use super::held::{GateScore, ShareGates};
use super::{Deferral, ItemState, Step};
use crate::error::CoreError;

/// The shunt's score for a held gate: 1 − max probability (higher: send it up).
pub fn score(step: &Step) -> f32 {
    1.0 - step.confidence
}

/// DS+'s shunt with a fixed threshold per cheap tier (`f32::INFINITY`: never answers; 0: always
/// answers once warm).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfidenceShunt {
    thresholds: Vec<f32>,
}

impl ConfidenceShunt {
    /// One threshold per cheap tier, cheapest first.
    pub fn new(thresholds: Vec<f32>) -> Self {
        ConfidenceShunt { thresholds }
    }
}

impl Deferral for ConfidenceShunt {
    fn name(&self) -> &'static str {
        "confidence"
    }

    fn defer(&mut self, _item: &mut ItemState, step: &Step) -> bool {
        let keep = self
            .thresholds
            .get(step.tier)
            .is_some_and(|&t| step.confidence >= t);
        !keep
    }
}

/// The shunt held to `target` of the items reaching the top tier: one threshold over max
/// probability for every cheap tier, set online.
pub fn max_prob_gate(target: f64, seed: u64) -> Result<ShareGates, CoreError> {
    ShareGates::new(GateScore::MaxProb, target, 1.0, seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ItemState;

    fn step(tier: usize, confidence: f32) -> Step<'static> {
        crate::policy::test_step(tier, 2, &[], &[], 0, confidence)
    }

    #[test]
    fn answers_at_its_threshold_per_tier() {
        let mut s = ConfidenceShunt::new(vec![0.9, f32::INFINITY]);
        assert!(!s.defer(&mut ItemState::default(), &step(0, 0.9)));
        assert!(s.defer(&mut ItemState::default(), &step(0, 0.89)));
        // A tier set to INFINITY never answers; one without a threshold neither.
        assert!(s.defer(&mut ItemState::default(), &step(1, 1.0)));
        assert!(s.defer(&mut ItemState::default(), &step(5, 1.0)));
        let mut always = ConfidenceShunt::new(vec![0.0]);
        assert!(!always.defer(&mut ItemState::default(), &step(0, 0.0)));
    }

    #[test]
    fn the_held_shunt_scores_by_max_probability() {
        assert!((score(&step(0, 0.8)) - 0.2).abs() < 1e-6);
        assert_eq!(max_prob_gate(0.3, 1).unwrap().name(), "max_prob");
    }
}
