//! E-LANG (Akbari et al., "E-LANG: Energy-Based Joint Inferencing of Super and Swift Language
//! Models", ACL 2022; its energy-based routing between the swift and the super model): a cheap
//! tier's answer is trusted by the energy of its logits, E(x) = −T·logsumexp(f(x)/T), low when the
//! model is in-distribution and confident, high when its logits are all small (out of its depth).
//! Here the energy is held to a target share of items reaching the top tier with one threshold for
//! every cheap tier ([`super::held`]). It reads only logits, so it applies to any tier exposing
//! them, and it differs from max probability where the scale of the logits carries information.
//!
//! It does not on a two-class linear head trained from zero (the hashed learner, the MiniLM
//! head): softmax cross-entropy's gradients for the two classes are opposite, so the logits stay
//! centred, f = (−a, a), and E = −T·logsumexp(±a/T) falls as max probability rises — the gate then
//! ranks, and decides, exactly as the held shunt. The logits passed are the models' raw ones (no
//! log-probabilities); the scale E-LANG reads is there in an LLM's verbalizer logits and a local
//! generator's token logits, not in an API's top log-probabilities (their energy is −ln of the
//! listed tokens' probability mass).

use super::held::{GateScore, ShareGates};
use super::signals::energy;
use super::Step;
use crate::error::CoreError;

/// The energy of the tier's logits at temperature `t` (higher: send it up); for a generated
/// answer, its mean token energy (infinite when its tier gave none: unknown cannot vouch).
pub fn score(step: &Step, t: f32) -> f32 {
    if step.logits.is_empty() {
        return step.token_energy.unwrap_or(f32::INFINITY);
    }
    energy(step.logits, t)
}

/// E-LANG's gate held to `target` of the items reaching the top tier.
pub fn energy_gate(target: f64, temperature: f32, seed: u64) -> Result<ShareGates, CoreError> {
    ShareGates::new(GateScore::Energy, target, temperature, seed)
}

#[cfg(test)]
mod tests {
    use super::super::Deferral;
    use super::*;
    use crate::policy::ItemState;

    fn step<'a>(probs: &'a [f32], logits: &'a [f32]) -> Step<'a> {
        crate::policy::test_step(0, 1, probs, logits, 1, probs[1])
    }

    /// Same margin (so the same max probability), different scale: the small logits have the
    /// higher energy; held at 50%, the quiet items go up and the loud ones stay.
    #[test]
    fn the_energy_gate_sends_up_the_quiet_logits() {
        let probs = [0.3775f32, 0.6225];
        let (loud, quiet) = ([6.0f32, 6.5], [0.0f32, 0.5]);
        assert!(score(&step(&probs, &quiet), 1.0) > score(&step(&probs, &loud), 1.0));
        let mut g = energy_gate(0.5, 1.0, 1).unwrap();
        let (mut loud_up, mut quiet_up) = (0, 0);
        for k in 0..2000 {
            let mut it = ItemState::default();
            g.begin_item(&mut it);
            let l = if k % 2 == 0 { &loud } else { &quiet };
            let up = g.defer(&mut it, &step(&probs, l));
            g.end_item(
                &it,
                &crate::policy::test_finished(if up { 1 } else { 0 }, 1, None, &[]),
            );
            if k >= 200 {
                *(if k % 2 == 0 {
                    &mut loud_up
                } else {
                    &mut quiet_up
                }) += u32::from(up);
            }
        }
        assert!(
            quiet_up > 800 && loud_up < 100,
            "quiet {quiet_up} loud {loud_up}"
        );
    }

    /// Why the energy gate matched the shunt row for row on two-class streams: a two-class
    /// online softmax trained from zero keeps centred logits, so its energy is a decreasing
    /// function of its max probability (same ranking, same decisions); uncentred logits (an
    /// LLM's) with the same max probability have different energies.
    #[test]
    fn a_two_class_head_from_zero_has_energy_tied_to_max_probability() {
        use crate::features::{FeatureVec, Featurizer, TextFeatures};
        use crate::learner::{LearnerConfig, OnlineSoftmax};
        let mut m = OnlineSoftmax::new(LearnerConfig::binary(12)).unwrap();
        let mut f = Featurizer::new(12).unwrap();
        let texts = [
            "good fun film",
            "dull and long",
            "a fine cast",
            "bad plot",
            "great",
        ];
        let mut x = FeatureVec::default();
        let mut probs = [0.0f32; 2];
        for k in 0..200 {
            x.clear();
            f.add_text(0, texts[k % 5], TextFeatures::default(), 1.0, &mut x);
            m.learn(&x, usize::from(k % 5 % 2 == 0), 1.0, &mut probs);
        }
        let mut seen = Vec::new();
        for t in texts.iter().chain(&["unseen words", "good but dull"]) {
            x.clear();
            f.add_text(0, t, TextFeatures::default(), 1.0, &mut x);
            let mut logits = [0.0f32; 2];
            m.logits(&x, &mut logits);
            assert!((logits[0] + logits[1]).abs() < 1e-4, "{logits:?}");
            m.predict(&x, &mut probs);
            seen.push((probs[0].max(probs[1]), energy(&logits, 1.0)));
        }
        seen.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(seen.windows(2).all(|w| w[1].1 <= w[0].1 + 1e-6), "{seen:?}");
        // An LLM's raw logits with the same margin but another level: another energy.
        assert!((energy(&[2.0, 4.0], 1.0) - energy(&[-1.0, 1.0], 1.0)).abs() > 1.0);
    }
}
