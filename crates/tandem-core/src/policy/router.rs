//! The route-before-generation router: two online logistic models over hashed n-grams of the
//! prompt (and the query's metadata) estimate the chance that each model answers well; the score is
//! the strong model's expected gain over the weak one. Each model learns only from outcomes it is
//! shown, so the same code serves full and partial feedback.

use super::{Observation, RouteScorer};
use crate::error::CoreError;
use crate::features::{ns, FeatureVec, Featurizer, Scratch, TextFeatures};
use crate::learner::{LearnerConfig, OnlineSoftmax};
use crate::query::Query;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    pub bits: u32,
    pub text: TextFeatures,
    pub learning_rate: f32,
    /// Use the query's metadata (e.g. a subject or task name) as features.
    pub use_metadata: bool,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            bits: 20,
            text: TextFeatures {
                word_ngrams: 2,
                char_min: 0,
                char_max: 0,
            },
            learning_rate: 0.05,
            use_metadata: true,
        }
    }
}

#[derive(Clone)]
pub struct GainRouter {
    cfg: RouterConfig,
    featurizer: Featurizer,
    x: FeatureVec,
    /// Id of the query whose features are in `x`, so learning right after scoring reuses them.
    x_of: Option<String>,
    weak: OnlineSoftmax,
    strong: OnlineSoftmax,
}

impl GainRouter {
    pub fn new(cfg: RouterConfig) -> Result<Self, CoreError> {
        let lc = LearnerConfig {
            learning_rate: cfg.learning_rate,
            ..LearnerConfig::binary(cfg.bits)
        };
        Ok(GainRouter {
            cfg,
            featurizer: Featurizer::new(cfg.bits)?,
            x: FeatureVec::default(),
            x_of: None,
            weak: OnlineSoftmax::new(lc)?,
            strong: OnlineSoftmax::new(lc)?,
        })
    }

    fn featurize(&mut self, q: &Query) {
        if self.x_of.as_deref() == Some(q.id.as_str()) {
            return;
        }
        Self::features_into(&self.cfg, &mut self.featurizer, q, &mut self.x);
        match &mut self.x_of {
            Some(s) => {
                s.clear();
                s.push_str(&q.id);
            }
            None => self.x_of = Some(q.id.clone()),
        }
    }

    /// The query's features, into a caller-owned buffer so a shared, read-only model can score.
    fn features_into(cfg: &RouterConfig, f: &mut Featurizer, q: &Query, x: &mut FeatureVec) {
        x.clear();
        f.add_bias(x);
        f.add_text(ns::PROMPT, q.routing_text(), cfg.text, 1.0, x);
        if cfg.use_metadata {
            for (k, v) in &q.metadata {
                f.add_token(ns::META ^ hash_key(k), v, 0.5, x);
            }
        }
    }

    /// Buffers for [`Self::score_ref`].
    pub fn scratch(&self) -> Result<Scratch, CoreError> {
        Scratch::new(self.cfg.bits)
    }

    /// Its features and learning rate (what a checkpoint must be loaded with).
    pub fn config(&self) -> RouterConfig {
        self.cfg
    }

    /// The strong model's expected gain, from a model shared read-only between threads.
    pub fn score_ref(&self, q: &Query, s: &mut Scratch) -> f32 {
        Self::features_into(&self.cfg, &mut s.featurizer, q, &mut s.a);
        self.strong.prob1(&s.a) - self.weak.prob1(&s.a)
    }

    /// Checkpoint: the two learners; the configuration is the caller's to give back on load.
    pub fn save(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        self.weak.save(w)?;
        self.strong.save(w)
    }

    pub fn load(cfg: RouterConfig, r: &mut impl std::io::Read) -> Result<Self, CoreError> {
        let mut g = GainRouter::new(cfg)?;
        g.weak = OnlineSoftmax::load(r)?;
        g.strong = OnlineSoftmax::load(r)?;
        if g.weak.config().bits != cfg.bits || g.strong.config().bits != cfg.bits {
            return Err(CoreError::config(
                "bits",
                cfg.bits,
                "the checkpoint was saved with a different feature size",
            ));
        }
        Ok(g)
    }

    /// Estimated probabilities that the weak and the strong model answer `q` well.
    pub fn probabilities(&mut self, q: &Query) -> (f32, f32) {
        self.featurize(q);
        (self.weak.prob1(&self.x), self.strong.prob1(&self.x))
    }
}

fn hash_key(k: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(k.as_bytes())
}

/// Learns a revealed outcome in [0, 1] as a soft binary label.
pub(crate) fn learn_outcome(m: &mut OnlineSoftmax, x: &FeatureVec, y: f32) {
    let mut p = [0.0f32; 2];
    m.predict(x, &mut p);
    let y = y.clamp(0.0, 1.0);
    if y > 0.0 {
        m.update(x, 1, y, &p);
    }
    if y < 1.0 {
        m.update(x, 0, 1.0 - y, &p);
    }
}

impl RouteScorer for GainRouter {
    fn score(&mut self, q: &Query) -> f32 {
        let (pw, ps) = self.probabilities(q);
        ps - pw
    }

    fn learn(&mut self, q: &Query, observed: &Observation) {
        self.featurize(q);
        if let Some(y) = observed.weak {
            learn_outcome(&mut self.weak, &self.x, y);
        }
        if let Some(y) = observed.strong {
            learn_outcome(&mut self.strong, &self.x, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_which_queries_gain_from_the_strong_model() {
        // "proof" questions: only the strong model is right; "capital" questions: both are.
        let mut r = GainRouter::new(RouterConfig::default()).unwrap();
        for i in 0..400 {
            let hard = i % 2 == 0;
            let text = if hard {
                format!("give a proof of lemma {i}")
            } else {
                format!("capital of country {i}")
            };
            let q = Query::text(format!("q{i}"), text);
            let _ = r.score(&q);
            r.learn(
                &q,
                &Observation {
                    weak: Some(if hard { 0.0 } else { 1.0 }),
                    strong: Some(1.0),
                },
            );
        }
        let hard = r.score(&Query::text("h", "give a proof of lemma 9999"));
        let easy = r.score(&Query::text("e", "capital of country 9999"));
        assert!(hard > 0.5 && easy < 0.1, "hard {hard} easy {easy}");
    }

    #[test]
    fn partial_feedback_updates_only_what_was_revealed() {
        let mut r = GainRouter::new(RouterConfig::default()).unwrap();
        let q = Query::text("a", "some question");
        let (w0, s0) = r.probabilities(&q);
        r.learn(
            &q,
            &Observation {
                weak: None,
                strong: Some(1.0),
            },
        );
        let (w1, s1) = r.probabilities(&q);
        assert_eq!(w0, w1);
        assert!(s1 > s0);
    }

    #[test]
    fn shared_scoring_and_checkpoint_match_the_learner() {
        let mut r = GainRouter::new(RouterConfig {
            bits: 12,
            ..RouterConfig::default()
        })
        .unwrap();
        for i in 0..50 {
            let q = Query::text(format!("q{i}"), format!("prove lemma {i}"));
            r.learn(
                &q,
                &Observation {
                    weak: Some(0.0),
                    strong: Some(1.0),
                },
            );
        }
        let q = Query::text("x", "prove lemma 7");
        let mut scratch = r.scratch().unwrap();
        let shared = r.score_ref(&q, &mut scratch);
        assert!((shared - r.score(&q)).abs() < 1e-6 && shared > 0.2);
        let mut buf = Vec::new();
        r.save(&mut buf).unwrap();
        let back = GainRouter::load(r.cfg, &mut buf.as_slice()).unwrap();
        assert_eq!(back.score_ref(&q, &mut scratch), shared);
        let other = RouterConfig { bits: 13, ..r.cfg };
        assert!(GainRouter::load(other, &mut buf.as_slice()).is_err());
    }
}
