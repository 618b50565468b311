//! The route-before-generation router: two online logistic models over hashed n-grams of the
//! prompt (and the query's metadata) estimate the chance that each model answers well; the score is
//! the strong model's expected gain over the weak one. Each model learns only from outcomes it is
//! shown, so the same code serves full and partial feedback.
//!
//! With an [`Embedder`] attached (issue 15), the prompt's sentence vector joins the n-grams in the
//! linear models (`embedding` sets its weight), and an online nearest-neighbour estimate over the
//! vectors of past queries (`knn`) is mixed with each linear estimate by an online stacker fitted
//! on predictions made before each outcome was learned ([`crate::embed`]).

use super::{Observation, RouteScorer};
use crate::embed::{Embedder, NeighbourEvidence};
use crate::error::CoreError;
use crate::features::{ns, FeatureVec, Featurizer, Scratch, TextFeatures};
use crate::learner::{LearnerConfig, OnlineSoftmax};
use crate::query::Query;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    pub bits: u32,
    pub text: TextFeatures,
    pub learning_rate: f32,
    /// Use the query's metadata (e.g. a subject or task name) as features.
    pub use_metadata: bool,
    /// Length of the sentence vectors the router reads; 0: it reads none (n-grams only).
    #[serde(default)]
    pub embedding_dim: u32,
    /// L2 norm of the prompt's vector among the linear models' features (the n-grams have 1).
    #[serde(default)]
    pub embedding: f32,
    /// Neighbours in the kNN estimate mixed into each model's estimate; 0: no kNN.
    #[serde(default)]
    pub knn: u32,
    /// Past queries the kNN estimate remembers (a ring: the oldest are forgotten).
    #[serde(default = "default_knn_memory")]
    pub knn_memory: u32,
}

pub(crate) fn default_knn_memory() -> u32 {
    4096
}

impl RouterConfig {
    /// The settings that read sentence vectors of length `dim`: the vector at weight 1 beside the
    /// n-grams and a 32-neighbour estimate over the last 4,096 queries.
    pub fn with_embeddings(self, dim: usize) -> Self {
        RouterConfig {
            embedding_dim: dim as u32,
            embedding: 1.0,
            knn: 32,
            knn_memory: default_knn_memory(),
            ..self
        }
    }

    /// Whether the router reads sentence vectors.
    pub fn reads_embeddings(&self) -> bool {
        self.embedding_dim > 0
    }

    fn validate(&self) -> Result<(), CoreError> {
        check_vector_settings(
            self.embedding_dim,
            self.embedding,
            self.knn,
            self.knn_memory,
        )
    }
}

/// The vector settings a router and a cascade scorer share: the vectors' length, their weight
/// among the linear features, the neighbours and the memory of the kNN estimate.
pub(crate) fn check_vector_settings(
    embedding_dim: u32,
    embedding: f32,
    knn: u32,
    knn_memory: u32,
) -> Result<(), CoreError> {
    if !(embedding >= 0.0 && embedding.is_finite()) {
        return Err(CoreError::config(
            "embedding",
            embedding,
            "must be zero or positive",
        ));
    }
    if embedding_dim > 4096 {
        return Err(CoreError::config(
            "embedding_dim",
            embedding_dim,
            "must be at most 4096",
        ));
    }
    if embedding_dim == 0 && (embedding > 0.0 || knn > 0) {
        return Err(CoreError::config(
            "embedding_dim",
            0,
            "embedding features or kNN need the vectors' length",
        ));
    }
    if knn > knn_memory || knn_memory > 1 << 20 {
        return Err(CoreError::config(
            "knn",
            format!("{knn} of {knn_memory}"),
            "k must be at most knn_memory, which must be at most 1,048,576",
        ));
    }
    Ok(())
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
            embedding_dim: 0,
            embedding: 0.0,
            knn: 0,
            knn_memory: default_knn_memory(),
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
    /// Where prompts' vectors come from; `None`: n-grams only, even if the configuration reads
    /// vectors (a router loaded before its embedder is attached).
    embedder: Option<Arc<dyn Embedder>>,
    /// The vector of the query in `x` (when the embedder had one).
    v: Option<Arc<[f32]>>,
    /// Feature indices of the vector's components.
    dense: Vec<u32>,
    evidence: Option<NeighbourEvidence>,
    /// The neighbours' estimates (weak, strong) for the query in `x`, so learning right after
    /// scoring does not search the memory again.
    knn_of_x: Option<[f32; 2]>,
    /// Prompts the router read without a vector although it was configured for them.
    pub missing_vectors: u64,
}

impl GainRouter {
    pub fn new(cfg: RouterConfig) -> Result<Self, CoreError> {
        let lc = LearnerConfig {
            learning_rate: cfg.learning_rate,
            ..LearnerConfig::binary(cfg.bits)
        };
        cfg.validate()?;
        let featurizer = Featurizer::new(cfg.bits)?;
        let dense = featurizer.dense_indices(ns::EMBEDDING, cfg.embedding_dim as usize);
        let evidence = if cfg.knn > 0 {
            Some(NeighbourEvidence::new(
                cfg.embedding_dim as usize,
                cfg.knn_memory as usize,
                cfg.knn as usize,
            )?)
        } else {
            None
        };
        Ok(GainRouter {
            cfg,
            featurizer,
            x: FeatureVec::default(),
            x_of: None,
            weak: OnlineSoftmax::new(lc)?,
            strong: OnlineSoftmax::new(lc)?,
            embedder: None,
            v: None,
            dense,
            evidence,
            knn_of_x: None,
            missing_vectors: 0,
        })
    }

    /// Attaches the encoder whose vectors the router reads.
    ///
    /// Errors: the router is not configured for vectors, or for vectors of another length.
    pub fn with_embedder(mut self, embedder: Arc<dyn Embedder>) -> Result<Self, CoreError> {
        if embedder.dim() != self.cfg.embedding_dim as usize {
            return Err(CoreError::config(
                "embedding_dim",
                self.cfg.embedding_dim,
                "differs from the encoder's vector length",
            ));
        }
        self.embedder = Some(embedder);
        self.x_of = None;
        Ok(self)
    }

    /// The attached encoder's name, if any.
    pub fn embedder_name(&self) -> Option<&str> {
        self.embedder.as_deref().map(|e| e.name())
    }

    fn featurize(&mut self, q: &Query) {
        if self.x_of.as_deref() == Some(q.id.as_str()) {
            return;
        }
        self.v = self.vector(q);
        self.knn_of_x = None;
        Self::features_into(
            &self.cfg,
            &mut self.featurizer,
            q,
            self.v.as_deref().map(|v| (v, self.dense.as_slice())),
            &mut self.x,
        );
        match &mut self.x_of {
            Some(s) => {
                s.clear();
                s.push_str(&q.id);
            }
            None => self.x_of = Some(q.id.clone()),
        }
    }

    /// The prompt's vector, when the router reads vectors and its encoder has one.
    fn vector(&mut self, q: &Query) -> Option<Arc<[f32]>> {
        if !self.cfg.reads_embeddings() {
            return None;
        }
        let v = self.embedder.as_ref()?.embed(q.routing_text());
        if v.is_none() {
            self.missing_vectors += 1;
        }
        v
    }

    /// The query's features, into a caller-owned buffer so a shared, read-only model can score.
    /// `dense`: the prompt's vector and its components' feature indices.
    fn features_into(
        cfg: &RouterConfig,
        f: &mut Featurizer,
        q: &Query,
        dense: Option<(&[f32], &[u32])>,
        x: &mut FeatureVec,
    ) {
        x.clear();
        f.add_bias(x);
        f.add_text(ns::PROMPT, q.routing_text(), cfg.text, 1.0, x);
        if cfg.use_metadata {
            for (k, v) in &q.metadata {
                f.add_token(ns::META ^ hash_key(k), v, 0.5, x);
            }
        }
        if let Some((v, at)) = dense {
            if cfg.embedding > 0.0 {
                for (&i, &c) in at.iter().zip(v) {
                    x.push(i, c * cfg.embedding);
                }
            }
        }
    }

    /// The neighbours' estimates (weak, strong) for vector `v`, when the router has a memory.
    fn neighbours(&self, v: Option<&[f32]>) -> Option<[f32; 2]> {
        match (&self.evidence, v) {
            (Some(ev), Some(v)) => Some([ev.memory[0].estimate(v).0, ev.memory[1].estimate(v).0]),
            _ => None,
        }
    }

    /// The linear estimates mixed with the neighbours' (when the router has both).
    fn mixed(&self, x: &FeatureVec, knn: Option<[f32; 2]>) -> (f32, f32) {
        let (pw, ps) = (self.weak.prob1(x), self.strong.prob1(x));
        match (&self.evidence, knn) {
            (Some(ev), Some([kw, ks])) => (ev.stack[0].mix(pw, kw), ev.stack[1].mix(ps, ks)),
            _ => (pw, ps),
        }
    }

    /// The neighbours' estimates for the query in `x`, searched once per query.
    fn neighbours_of_x(&mut self) -> Option<[f32; 2]> {
        if self.knn_of_x.is_none() {
            self.knn_of_x = self.neighbours(self.v.as_deref());
        }
        self.knn_of_x
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
        let v = if self.cfg.reads_embeddings() {
            self.embedder
                .as_ref()
                .and_then(|e| e.embed(q.routing_text()))
        } else {
            None
        };
        Self::features_into(
            &self.cfg,
            &mut s.featurizer,
            q,
            v.as_deref().map(|v| (v, self.dense.as_slice())),
            &mut s.a,
        );
        let (pw, ps) = self.mixed(&s.a, self.neighbours(v.as_deref()));
        ps - pw
    }

    /// Checkpoint: the two learners, then the neighbour evidence when the configuration has kNN;
    /// the configuration is the caller's to give back on load.
    pub fn save(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        self.weak.save(w)?;
        self.strong.save(w)?;
        if let Some(ev) = &self.evidence {
            ev.save(w)?;
        }
        Ok(())
    }

    /// Reads a checkpoint [`GainRouter::save`] wrote. The neighbour memory is optional both
    /// ways, so a route may start or stop reading sentence vectors and keep what it learned: a
    /// checkpoint without one loads with an empty memory into settings with kNN; one with a
    /// memory loads into settings without kNN and the memory is dropped (the vectors' weights in
    /// the linear models are then never read).
    pub fn load(cfg: RouterConfig, r: &mut &[u8]) -> Result<Self, CoreError> {
        let mut g = GainRouter::new(cfg)?;
        g.weak = OnlineSoftmax::load(r)?;
        g.strong = OnlineSoftmax::load(r)?;
        if !r.starts_with(crate::embed::EVIDENCE_MAGIC) {
            // Saved without vectors (or before them): the memory, if any, starts empty.
        } else if g.evidence.is_none() {
            NeighbourEvidence::load(r)?;
        } else {
            let ev = NeighbourEvidence::load(r)?;
            if ev.memory[0].dim() != cfg.embedding_dim as usize {
                return Err(CoreError::config(
                    "embedding_dim",
                    cfg.embedding_dim,
                    "the checkpoint's neighbour memory holds vectors of another length",
                ));
            }
            g.evidence = Some(ev);
        }
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
        let knn = self.neighbours_of_x();
        self.mixed(&self.x, knn)
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

impl GainRouter {
    /// Teaches the linear models alone: a later pass over items the neighbour memory (and its
    /// stacker) already learned, which would otherwise find each item as its own neighbour.
    pub fn learn_linear(&mut self, q: &Query, observed: &Observation) {
        self.featurize(q);
        if let Some(y) = observed.weak {
            learn_outcome(&mut self.weak, &self.x, y);
        }
        if let Some(y) = observed.strong {
            learn_outcome(&mut self.strong, &self.x, y);
        }
    }
}

impl RouteScorer for GainRouter {
    fn score(&mut self, q: &Query) -> f32 {
        let (pw, ps) = self.probabilities(q);
        ps - pw
    }

    fn learn(&mut self, q: &Query, observed: &Observation) {
        self.featurize(q);
        // The stackers learn from the estimates as they stood before this outcome was learned
        // (found when the query was scored, if it was just scored).
        let knn = self.neighbours_of_x();
        if let (Some(ev), Some(v), Some(knn)) = (&mut self.evidence, self.v.as_deref(), knn) {
            for (arm, y, model) in [
                (0, observed.weak, &self.weak),
                (1, observed.strong, &self.strong),
            ] {
                if let Some(y) = y {
                    ev.stack[arm].learn(model.prob1(&self.x), knn[arm], y);
                    ev.memory[arm].add(v, y);
                }
            }
            // The memory has changed: a later score of the same query searches it again.
            self.knn_of_x = None;
        }
        self.learn_linear(q, observed);
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

    /// Prompts whose words say nothing (a fresh number each) but whose vectors fall in two
    /// clusters: only the strong model answers the first cluster.
    fn clustered(n: usize) -> (Arc<crate::embed::EmbeddingTable>, Vec<(Query, bool)>) {
        let mut table = crate::embed::EmbeddingTable::new("test", 8).unwrap();
        let mut out = Vec::new();
        for i in 0..n {
            let hard = i % 3 == 0;
            let text = format!("item {}", 7919 * i + 13);
            let mut v = [0.0f32; 8];
            v[if hard { 0 } else { 1 }] = 1.0;
            // A little spread, so no two vectors are equal.
            v[2 + i % 6] = 0.1 + (i % 7) as f32 * 0.02;
            table.insert(&text, &v).unwrap();
            out.push((Query::text(format!("q{i}"), text), hard));
        }
        (Arc::new(table), out)
    }

    #[test]
    fn embeddings_carry_what_the_words_do_not() {
        let (table, items) = clustered(700);
        let (train, test) = items.split_at(600);
        let mut plain = GainRouter::new(RouterConfig::default()).unwrap();
        let mut with = GainRouter::new(RouterConfig::default().with_embeddings(8))
            .unwrap()
            .with_embedder(table.clone())
            .unwrap();
        for (q, hard) in train {
            let seen = Observation {
                weak: Some(if *hard { 0.0 } else { 1.0 }),
                strong: Some(1.0),
            };
            for r in [&mut plain, &mut with] {
                let _ = r.score(q);
                r.learn(q, &seen);
            }
        }
        // Mean score gap between unseen hard and easy prompts.
        let gap = |r: &mut GainRouter| {
            let (mut h, mut e, mut nh, mut ne) = (0.0, 0.0, 0, 0);
            for (q, hard) in test {
                let s = r.score(q);
                if *hard {
                    h += s;
                    nh += 1;
                } else {
                    e += s;
                    ne += 1;
                }
            }
            h / nh as f32 - e / ne as f32
        };
        let (g_plain, g_with) = (gap(&mut plain), gap(&mut with));
        assert!(
            g_with > 0.6 && g_plain < 0.2,
            "with vectors {g_with}, words alone {g_plain}"
        );
        assert_eq!(with.missing_vectors, 0);
        // A prompt the encoder has no vector for is scored on its words, and counted.
        let _ = with.score(&Query::text("new", "never embedded"));
        assert_eq!(with.missing_vectors, 1);
    }

    #[test]
    fn an_embedding_router_checks_its_encoder_and_round_trips() {
        let (table, items) = clustered(100);
        let cfg = RouterConfig {
            bits: 12,
            ..RouterConfig::default().with_embeddings(8)
        };
        assert!(GainRouter::new(cfg.with_embeddings(16))
            .unwrap()
            .with_embedder(table.clone())
            .is_err());
        let mut r = GainRouter::new(cfg)
            .unwrap()
            .with_embedder(table.clone())
            .unwrap();
        for (q, hard) in &items {
            r.learn(
                q,
                &Observation {
                    weak: Some(if *hard { 0.0 } else { 1.0 }),
                    strong: Some(1.0),
                },
            );
        }
        let mut buf = Vec::new();
        r.save(&mut buf).unwrap();
        let back = GainRouter::load(cfg, &mut buf.as_slice())
            .unwrap()
            .with_embedder(table)
            .unwrap();
        let mut scratch = r.scratch().unwrap();
        for (q, _) in items.iter().take(10) {
            assert_eq!(back.score_ref(q, &mut scratch), r.score(q));
        }
        // Without its neighbour memory (saved before vectors) the checkpoint loads with an empty
        // one, and a memory is dropped by settings without kNN: the linear models carry over.
        let plain = RouterConfig {
            bits: 12,
            ..RouterConfig::default()
        };
        let plain_len = {
            let mut b = Vec::new();
            GainRouter::new(plain).unwrap().save(&mut b).unwrap();
            b.len()
        };
        let mut head = &buf[..plain_len];
        let fresh = GainRouter::load(cfg, &mut head).unwrap();
        assert!(head.is_empty());
        assert_eq!(fresh.evidence.as_ref().unwrap().memory[0].len(), 0);
        let mut all = buf.as_slice();
        let dropped = GainRouter::load(plain, &mut all).unwrap();
        assert!(all.is_empty() && dropped.evidence.is_none());
        let mut s = r.scratch().unwrap();
        GainRouter::features_into(&plain, &mut s.featurizer, &items[0].0, None, &mut s.a);
        assert_eq!(dropped.weak.prob1(&s.a), r.weak.prob1(&s.a));
        // A damaged memory is refused.
        assert!(GainRouter::load(cfg, &mut &buf[..buf.len() - 3]).is_err());
        // Settings that read vectors need their length.
        let bad = RouterConfig {
            knn: 8,
            ..RouterConfig::default()
        };
        assert!(GainRouter::new(bad).is_err());
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
