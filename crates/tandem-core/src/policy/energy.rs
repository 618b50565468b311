//! E-LANG (Akbari et al., "E-LANG: Energy-Based Joint Inferencing of Super and Swift Language
//! Models", ACL 2022; its energy-based routing between the swift and the super model): a cheap
//! tier's answer is trusted by the energy of its logits, E(x) = −T·logsumexp(f(x)/T), low when the
//! model is in-distribution and confident, high when its logits are all small (out of its depth).
//! Here the energy is held to a target share of items reaching the top tier with one threshold for
//! every cheap tier ([`super::held`]). It reads only logits, so it applies to any tier exposing
//! them, and it differs from max probability where the scale of the logits carries information.

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
                &super::super::Finished {
                    query: &crate::policy::TEST_QUERY,
                    top_text: None,
                    answered: if up { 1 } else { 0 },
                    top: 1,
                    top_label: None,
                    cheap: &[],
                },
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
}
