//! Who learns from whom: DS+'s two teaching directions (Chen, Zhang et al., "Improving Large
//! Models with Small Models: Lower Costs and Better Performance", 2024, arXiv 2406.15471: S4L,
//! the small model's answer as prior knowledge for the large one, and L4S, the large model's
//! answers teaching the small one). They are the cascade engine's teaching step rather than a
//! deferral policy: they act on how the top tier is asked and on how its answer trains the tiers
//! below, whatever rule decides when to go up, so any deferral policy combines with them.
//!
//! L4S in its plain form (every top-tier answer teaches every cheap tier at full weight) is the
//! online imitation OCL relies on too.

use serde::{Deserialize, Serialize};

/// S4L: what the top tier learns of the last cheap tier's answer when an item reaches it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum S4l {
    #[default]
    Off,
    /// The prompt carries "a smaller model says X (confidence p)"; only once the cheap tier is
    /// past its warm-up (an untrained tier's guess is noise).
    Soft,
    /// Classes the cheap tier rules out are removed from the top tier's choice.
    Hard,
}

/// L4S: how the top tier's answers train the cheap tiers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum L4s {
    /// Every top-tier label teaches the cheap tiers at full weight.
    #[default]
    Imitate,
    /// Two stages: imitate the first `l4s_imitate_first` labels, then weight each by the top
    /// tier's own confidence (its margin over a uniform guess), so its unsure answers teach less.
    Weighted,
}

/// S4L and L4S, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Teaching {
    pub s4l: S4l,
    /// Hard S4L: classes the cheap tier gives less than this are ruled out.
    pub s4l_prune: f32,
    pub l4s: L4s,
    /// Weighted L4S: labels imitated at full weight before weighting starts.
    pub l4s_imitate_first: u64,
}

impl Default for Teaching {
    fn default() -> Self {
        Teaching {
            s4l: S4l::Off,
            s4l_prune: 0.1,
            l4s: L4s::Imitate,
            l4s_imitate_first: 500,
        }
    }
}

impl Teaching {
    /// The weight of a top-tier label for the cheap tiers: 1 while imitating; then the top
    /// tier's margin over a uniform guess, so an unsure answer teaches little.
    pub fn l4s_weight(&self, updates_so_far: u64, top_confidence: f32, classes: usize) -> f32 {
        match self.l4s {
            L4s::Imitate => 1.0,
            L4s::Weighted if updates_so_far < self.l4s_imitate_first => 1.0,
            L4s::Weighted => {
                let uniform = 1.0 / classes.max(2) as f32;
                ((top_confidence - uniform) / (1.0 - uniform)).clamp(0.0, 1.0)
            }
        }
    }
}

/// Hard S4L: the top tier's probabilities with the classes the cheap tier rules out (below
/// `prune`) removed and the rest renormalised; unchanged when nothing, or everything, is ruled out.
/// Says whether a class was removed.
pub fn prune_classes(top: &mut [f32], cheap: &[f32], prune: f32) -> bool {
    let kept: f32 = top
        .iter()
        .zip(cheap)
        .filter(|(_, &c)| c >= prune)
        .map(|(t, _)| *t)
        .sum();
    if kept <= 0.0 || top.len() != cheap.len() || cheap.iter().all(|&c| c >= prune) {
        return false;
    }
    for (t, &c) in top.iter_mut().zip(cheap) {
        *t = if c >= prune { *t / kept } else { 0.0 };
    }
    true
}

/// Soft S4L's prior: the last cheap tier's answer and confidence (to 10%, so that recorded hinted
/// answers are reused across runs), appended to the top tier's prompt.
pub fn hint_text(label: &str, confidence: f32) -> String {
    format!(
        "\n\nA smaller model says: {label} (confidence {:.0}%).",
        10.0 * (10.0 * confidence).round()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s4l_hint_names_the_cheap_answer_and_its_confidence() {
        assert_eq!(
            hint_text("negative", 0.734),
            "\n\nA smaller model says: negative (confidence 70%)."
        );
        assert!(hint_text("positive", 0.96).ends_with("positive (confidence 100%)."));
    }

    #[test]
    fn hard_s4l_prunes_only_what_the_cheap_tier_rules_out() {
        let mut top = vec![0.5, 0.3, 0.2];
        assert!(prune_classes(&mut top, &[0.05, 0.5, 0.45], 0.1));
        assert_eq!(top, vec![0.0, 0.6, 0.4]);
        // Nothing left to choose from: the top tier's answer stands.
        let mut top = vec![0.0, 1.0];
        assert!(!prune_classes(&mut top, &[0.99, 0.01], 0.1));
        assert_eq!(top, vec![0.0, 1.0]);
        assert!(!prune_classes(&mut top, &[0.5, 0.5], 0.1));
    }

    #[test]
    fn weighted_l4s_imitates_first_then_weights_by_the_top_margin() {
        let t = Teaching {
            s4l: S4l::Off,
            s4l_prune: 0.1,
            l4s: L4s::Weighted,
            l4s_imitate_first: 10,
        };
        assert_eq!(t.l4s_weight(9, 0.55, 2), 1.0);
        assert!((t.l4s_weight(10, 0.55, 2) - 0.1).abs() < 1e-6);
        assert!((t.l4s_weight(10, 1.0, 2) - 1.0).abs() < 1e-6);
        assert_eq!(t.l4s_weight(10, 0.3, 2), 0.0);
        let imitate = Teaching {
            l4s: L4s::Imitate,
            ..t
        };
        assert_eq!(imitate.l4s_weight(1000, 0.55, 2), 1.0);
    }
}
