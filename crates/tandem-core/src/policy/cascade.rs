//! The cascade-after-generation policy: the weak model answers first; a learned scorer reads the
//! prompt and the weak answer (its n-grams and the signals of [`super::response`]) and estimates
//! whether the answer is right. The score is the expected gain of escalating: the chance the
//! strong model is right (from the prompt) less the chance the weak answer already is.

use super::response::{analyze, ResponseSignals};
use super::router::learn_outcome;
use super::{CascadeScorer, Observation};
use crate::answer::{Answer, Output};
use crate::error::CoreError;
use crate::features::{ns, FeatureVec, Featurizer, Scratch, TextFeatures};
use crate::learner::{LearnerConfig, OnlineSoftmax};
use crate::query::Query;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CascadeConfig {
    pub bits: u32,
    pub prompt_text: TextFeatures,
    pub response_text: TextFeatures,
    pub learning_rate: f32,
}

impl Default for CascadeConfig {
    fn default() -> Self {
        let words = TextFeatures {
            word_ngrams: 2,
            char_min: 0,
            char_max: 0,
        };
        CascadeConfig {
            bits: 20,
            prompt_text: words,
            response_text: words,
            learning_rate: 0.05,
        }
    }
}

#[derive(Clone)]
pub struct ResponseCascade {
    cfg: CascadeConfig,
    featurizer: Featurizer,
    /// Prompt features (for the strong model's chance) and prompt + answer features (for the
    /// weak answer's), for the query in `x_of`.
    x_prompt: FeatureVec,
    x_answer: FeatureVec,
    x_of: Option<String>,
    weak: OnlineSoftmax,
    strong: OnlineSoftmax,
}

impl ResponseCascade {
    pub fn new(cfg: CascadeConfig) -> Result<Self, CoreError> {
        let lc = LearnerConfig {
            learning_rate: cfg.learning_rate,
            ..LearnerConfig::binary(cfg.bits)
        };
        Ok(ResponseCascade {
            cfg,
            featurizer: Featurizer::new(cfg.bits)?,
            x_prompt: FeatureVec::default(),
            x_answer: FeatureVec::default(),
            x_of: None,
            weak: OnlineSoftmax::new(lc)?,
            strong: OnlineSoftmax::new(lc)?,
        })
    }

    fn featurize(&mut self, q: &Query, weak: &Answer) {
        if self.x_of.as_deref() == Some(q.id.as_str()) {
            return;
        }
        Self::features_into(
            &self.cfg,
            &mut self.featurizer,
            q,
            weak,
            &mut self.x_prompt,
            &mut self.x_answer,
        );
        self.x_of = Some(q.id.clone());
    }

    /// Prompt features (for the strong model's chance) and prompt + answer features (for the weak
    /// answer's), written into caller-owned buffers so a shared, read-only model can score.
    fn features_into(
        cfg: &CascadeConfig,
        f: &mut Featurizer,
        q: &Query,
        weak: &Answer,
        x_prompt: &mut FeatureVec,
        x_answer: &mut FeatureVec,
    ) {
        let prompt = q.routing_text();
        x_prompt.clear();
        f.add_bias(x_prompt);
        f.add_text(ns::PROMPT, prompt, cfg.prompt_text, 1.0, x_prompt);
        x_answer.clear();
        x_answer.extend_from(x_prompt);
        match &weak.output {
            Output::Text {
                text,
                token_logprobs,
            } => {
                f.add_text(ns::RESPONSE, text, cfg.response_text, 1.0, x_answer);
                add_signals(f, &analyze(prompt, text), x_answer);
                if let Some(lp) = token_logprobs.as_deref().filter(|l| !l.is_empty()) {
                    let mean = lp.iter().sum::<f32>() / lp.len() as f32;
                    let min = lp.iter().copied().fold(0.0f32, f32::min);
                    f.add_numeric("mean_logprob", mean.max(-10.0) / 3.0, x_answer);
                    f.add_numeric("min_logprob", min.max(-20.0) / 6.0, x_answer);
                }
            }
            Output::Label { probs, .. } => {
                let max = probs.iter().copied().fold(0.0f32, f32::max);
                f.add_numeric("max_prob", max, x_answer);
            }
        }
    }

    /// The escalation gain (strong's chance less the weak answer's) from a shared, read-only model.
    pub fn score_ref(&self, q: &Query, weak: &Answer, s: &mut Scratch) -> f32 {
        Self::features_into(&self.cfg, &mut s.featurizer, q, weak, &mut s.a, &mut s.b);
        self.strong.prob1(&s.a) - self.weak.prob1(&s.b)
    }

    /// Buffers for [`Self::score_ref`].
    pub fn scratch(&self) -> Result<Scratch, CoreError> {
        Scratch::new(self.cfg.bits)
    }

    /// Its features and learning rate (what a checkpoint must be loaded with).
    pub fn config(&self) -> CascadeConfig {
        self.cfg
    }

    /// Checkpoint: the two learners; the configuration is the caller's to give back on load.
    pub fn save(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        self.weak.save(w)?;
        self.strong.save(w)
    }

    pub fn load(cfg: CascadeConfig, r: &mut impl std::io::Read) -> Result<Self, CoreError> {
        let mut c = ResponseCascade::new(cfg)?;
        c.weak = OnlineSoftmax::load(r)?;
        c.strong = OnlineSoftmax::load(r)?;
        if c.weak.config().bits != cfg.bits || c.strong.config().bits != cfg.bits {
            return Err(CoreError::config(
                "bits",
                cfg.bits,
                "the checkpoint was saved with a different feature size",
            ));
        }
        Ok(c)
    }

    /// Estimated chances that the weak answer is right and that the strong model would be.
    pub fn probabilities(&mut self, q: &Query, weak: &Answer) -> (f32, f32) {
        self.featurize(q, weak);
        (
            self.weak.prob1(&self.x_answer),
            self.strong.prob1(&self.x_prompt),
        )
    }
}

/// Numeric signals as features, each scaled to about [0, 2].
fn add_signals(f: &Featurizer, s: &ResponseSignals, out: &mut FeatureVec) {
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    f.add_numeric("has_final_marker", flag(s.has_final_marker), out);
    f.add_numeric("no_final_answer", flag(s.final_answer.is_none()), out);
    f.add_numeric("ends_with_number", flag(s.ends_with_number), out);
    f.add_numeric("log_chars", (1.0 + s.chars as f32).ln() / 4.0, out);
    f.add_numeric("equations", (s.equations as f32).min(10.0) / 5.0, out);
    f.add_numeric(
        "wrong_equations",
        (s.wrong_equations as f32).min(4.0) / 2.0,
        out,
    );
    f.add_numeric("any_wrong_equation", flag(s.wrong_equations > 0), out);
    f.add_numeric("hedges", (s.hedges as f32).min(4.0) / 2.0, out);
    f.add_numeric("corrections", (s.corrections as f32).min(4.0) / 2.0, out);
    f.add_numeric("final_in_prompt", flag(s.final_in_prompt), out);
    if let Some(a) = s.final_answer {
        f.add_numeric("final_not_integer", flag(a.fract().abs() > 1e-9), out);
        f.add_numeric("final_negative", flag(a < 0.0), out);
        f.add_numeric(
            "final_log_magnitude",
            (1.0 + a.abs() as f32).ln() / 5.0,
            out,
        );
    }
}

impl CascadeScorer for ResponseCascade {
    fn score(&mut self, q: &Query, weak: &Answer) -> f32 {
        let (pw, ps) = self.probabilities(q, weak);
        ps - pw
    }

    fn learn(&mut self, q: &Query, weak: &Answer, observed: &Observation) {
        self.featurize(q, weak);
        if let Some(y) = observed.weak {
            learn_outcome(&mut self.weak, &self.x_answer, y);
        }
        if let Some(y) = observed.strong {
            learn_outcome(&mut self.strong, &self.x_prompt, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::Usage;
    use std::time::Duration;

    fn answer(text: &str) -> Answer {
        Answer {
            tier: "weak".into(),
            output: Output::Text {
                text: text.into(),
                token_logprobs: None,
            },
            usage: Usage::default(),
            cost: 0,
            compute: Duration::ZERO,
        }
    }

    #[test]
    fn learns_that_wrong_arithmetic_means_escalate() {
        let mut c = ResponseCascade::new(CascadeConfig::default()).unwrap();
        for i in 0..600u32 {
            let (a, b) = (i % 50 + 2, i % 7 + 3);
            let right = i % 3 != 0;
            let shown = if right { a * b } else { a * b + 5 };
            let q = Query::text(format!("q{i}"), format!("What is {a} times {b}?"));
            let ans = answer(&format!("{a} * {b} = {shown}\n#### {shown}"));
            let _ = c.score(&q, &ans);
            c.learn(
                &q,
                &ans,
                &Observation {
                    weak: Some(if right { 1.0 } else { 0.0 }),
                    strong: Some(1.0),
                },
            );
        }
        let q = Query::text("t1", "What is 13 times 4?");
        let good = c.score(&q, &answer("13 * 4 = 52\n#### 52"));
        let q = Query::text("t2", "What is 13 times 4?");
        let bad = c.score(&q, &answer("13 * 4 = 57\n#### 57"));
        assert!(bad > good + 0.3, "bad {bad} good {good}");
    }
}
