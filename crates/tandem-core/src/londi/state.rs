//! What the controller sees of a step, and its feature vector.

use crate::error::CoreError;
use crate::features::{ns, FeatureVec, Featurizer, TextFeatures};

/// One step of an episode as the controller sees it. Everything but the text is optional, so a
/// gateway that knows only the prompt can use the same controller as an agent loop that knows the
/// admissible actions and the small policy's confidence.
#[derive(Debug, Clone, Copy, Default)]
pub struct SwitchState<'a> {
    /// The observation (or prompt) at this step.
    pub text: &'a str,
    /// 0-based index of the step in its episode.
    pub step: u32,
    /// Number of admissible actions, when known.
    pub admissible: Option<usize>,
    /// The small policy's probability of its own choice, in [0, 1], when it has one.
    pub small_confidence: Option<f32>,
    /// Its margin over the runner-up, in [0, 1].
    pub small_margin: Option<f32>,
    /// The entropy of its distribution over the admissible actions, over the log of their number:
    /// 0 sure, 1 uniform.
    pub small_entropy: Option<f32>,
    /// How many earlier steps of the episode were in this same state (a loop when above 0).
    pub revisits: Option<u32>,
}

const CONF_BUCKETS: usize = 8;
const WORDS: TextFeatures = TextFeatures {
    word_ngrams: 2,
    char_min: 0,
    char_max: 0,
};

/// Builds φ(s): bias, the text's word n-grams, and numeric features with coarse one-hot buckets
/// (a linear Q over buckets can still say "call the large model only when confidence is low and
/// budget is left").
#[derive(Debug, Clone)]
pub struct StateFeatures {
    featurizer: Featurizer,
    horizon: u32,
}

impl StateFeatures {
    pub fn new(bits: u32, horizon: u32) -> Result<Self, CoreError> {
        Ok(StateFeatures {
            featurizer: Featurizer::new(bits)?,
            horizon: horizon.max(1),
        })
    }

    /// `budget`: (calls left, budget) under LONDI-B.
    pub fn build(&mut self, s: &SwitchState, budget: Option<(u32, u32)>, out: &mut FeatureVec) {
        out.clear();
        let f = &mut self.featurizer;
        f.add_bias(out);
        f.add_text(ns::PROMPT, s.text, WORDS, 1.0, out);
        let step = (s.step.min(self.horizon) as f32) / self.horizon as f32;
        f.add_numeric("step", step, out);
        f.add_token(ns::META, &format!("step={}", s.step.min(12)), 1.0, out);
        if let Some(n) = s.admissible {
            f.add_numeric("ln_admissible", ((n + 1) as f32).ln() / 3.0, out);
        }
        match s.small_confidence {
            Some(c) => {
                let c = c.clamp(0.0, 1.0);
                f.add_numeric("small_conf", c, out);
                let bucket = ((c * CONF_BUCKETS as f32) as usize).min(CONF_BUCKETS - 1);
                f.add_token(ns::META, &format!("conf={bucket}"), 1.0, out);
            }
            None => f.add_token(ns::META, "conf=none", 1.0, out),
        }
        if let Some(m) = s.small_margin {
            f.add_numeric("small_margin", m.clamp(0.0, 1.0), out);
        }
        if let Some(h) = s.small_entropy {
            let h = h.clamp(0.0, 1.0);
            f.add_numeric("small_entropy", h, out);
            let bucket = ((h * CONF_BUCKETS as f32) as usize).min(CONF_BUCKETS - 1);
            f.add_token(ns::META, &format!("entropy={bucket}"), 1.0, out);
        }
        if let Some(r) = s.revisits {
            f.add_token(ns::META, &format!("revisits={}", r.min(3)), 1.0, out);
        }
        if let Some((left, total)) = budget {
            f.add_numeric("budget_left", left as f32 / total.max(1) as f32, out);
            f.add_token(ns::META, &format!("left={}", left.min(5)), 1.0, out);
        }
    }
}
