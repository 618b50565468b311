//! The cascade-after-generation policy: the weak model answers first; a learned scorer reads the
//! prompt and the weak answer (its n-grams and the signals of [`super::response`]) and estimates
//! whether the answer is right. The score is the expected gain of escalating: the chance the
//! strong model is right (from the prompt) less the chance the weak answer already is.
//!
//! With an [`Embedder`] attached (issue 15), the prompt's sentence vector joins the strong
//! model's features and the prompt's and the answer's join the weak answer's; an online
//! nearest-neighbour estimate (over past answers' vectors for the weak answer, past prompts' for
//! the strong model) is mixed into each linear estimate by an online stacker, as the router does
//! ([`super::router`], [`crate::embed`]).

use super::response::{analyze, ResponseSignals};
use super::router::{check_vector_settings, default_knn_memory, learn_outcome};
use super::{CascadeScorer, Observation};
use crate::answer::{Answer, Output};
use crate::embed::{Embedder, NeighbourEvidence};
use crate::error::CoreError;
use crate::features::{ns, FeatureVec, Featurizer, Scratch, TextFeatures};
use crate::learner::{LearnerConfig, OnlineSoftmax};
use crate::query::Query;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CascadeConfig {
    pub bits: u32,
    pub prompt_text: TextFeatures,
    pub response_text: TextFeatures,
    pub learning_rate: f32,
    /// Length of the sentence vectors the scorer reads; 0: it reads none.
    #[serde(default)]
    pub embedding_dim: u32,
    /// L2 norm of each vector (the prompt's, the answer's) among the linear features.
    #[serde(default)]
    pub embedding: f32,
    /// Neighbours in the kNN estimate mixed into each model's estimate; 0: no kNN.
    #[serde(default)]
    pub knn: u32,
    /// Past items the kNN estimate remembers (a ring: the oldest are forgotten).
    #[serde(default = "default_knn_memory")]
    pub knn_memory: u32,
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
            embedding_dim: 0,
            embedding: 0.0,
            knn: 0,
            knn_memory: default_knn_memory(),
        }
    }
}

impl CascadeConfig {
    /// The settings that read sentence vectors of length `dim`: each vector at weight 0.1 beside
    /// the n-grams and signals, and a 32-neighbour estimate over the last 4,096 items. Not the
    /// router's weight 1: two dense vectors move every weight of 768 on every item, and on
    /// GSM8K's 1,319 items that noise cost 0.027 APGR at weight 1 and 0.008 at 0.1 (README).
    pub fn with_embeddings(self, dim: usize) -> Self {
        CascadeConfig {
            embedding_dim: dim as u32,
            embedding: 0.1,
            knn: 32,
            knn_memory: default_knn_memory(),
            ..self
        }
    }

    /// Whether the scorer reads sentence vectors.
    pub fn reads_embeddings(&self) -> bool {
        self.embedding_dim > 0
    }
}

/// The item's sentence vectors: the prompt's and the weak answer's, each when the encoder had it.
#[derive(Clone, Default)]
struct Vectors {
    prompt: Option<Arc<[f32]>>,
    answer: Option<Arc<[f32]>>,
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
    /// Where the prompts' and answers' vectors come from; `None`: n-grams and signals only, even
    /// if the configuration reads vectors (a scorer loaded before its embedder is attached).
    embedder: Option<Arc<dyn Embedder>>,
    /// The vectors of the query in `x_of`.
    v: Vectors,
    /// Feature indices of the prompt's and the answer's vector components.
    dense_prompt: Vec<u32>,
    dense_answer: Vec<u32>,
    /// Neighbours: `memory[0]` holds past answers' vectors and whether they were right,
    /// `memory[1]` past prompts' and whether the strong model was.
    evidence: Option<NeighbourEvidence>,
    /// Prompts and answers the scorer read without a vector although it was configured for them.
    pub missing_vectors: u64,
}

impl ResponseCascade {
    pub fn new(cfg: CascadeConfig) -> Result<Self, CoreError> {
        let lc = LearnerConfig {
            learning_rate: cfg.learning_rate,
            ..LearnerConfig::binary(cfg.bits)
        };
        check_vector_settings(cfg.embedding_dim, cfg.embedding, cfg.knn, cfg.knn_memory)?;
        let featurizer = Featurizer::new(cfg.bits)?;
        let dim = cfg.embedding_dim as usize;
        let dense_prompt = featurizer.dense_indices(ns::EMBEDDING, dim);
        let dense_answer = featurizer.dense_indices(ns::RESPONSE_EMBEDDING, dim);
        let evidence = if cfg.knn > 0 {
            Some(NeighbourEvidence::new(
                dim,
                cfg.knn_memory as usize,
                cfg.knn as usize,
            )?)
        } else {
            None
        };
        Ok(ResponseCascade {
            cfg,
            featurizer,
            x_prompt: FeatureVec::default(),
            x_answer: FeatureVec::default(),
            x_of: None,
            weak: OnlineSoftmax::new(lc)?,
            strong: OnlineSoftmax::new(lc)?,
            embedder: None,
            v: Vectors::default(),
            dense_prompt,
            dense_answer,
            evidence,
            missing_vectors: 0,
        })
    }

    /// Reads the prompts' and the weak answers' vectors from `embedder` (both looked up by text).
    ///
    /// Errors: the scorer is not configured for vectors, or for vectors of another length.
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

    /// The prompt's and the answer's vectors, when the scorer reads vectors and has an encoder;
    /// `missed` counts the texts the encoder had none for.
    fn vectors(&self, q: &Query, weak: &Answer, missed: &mut u64) -> Vectors {
        let Some(e) = self
            .embedder
            .as_ref()
            .filter(|_| self.cfg.reads_embeddings())
        else {
            return Vectors::default();
        };
        let mut get = |text: &str| {
            let v = e.embed(text);
            *missed += u64::from(v.is_none());
            v
        };
        Vectors {
            prompt: get(q.routing_text()),
            answer: match &weak.output {
                Output::Text { text, .. } => get(text),
                Output::Label { .. } => None,
            },
        }
    }

    fn featurize(&mut self, q: &Query, weak: &Answer) {
        if self.x_of.as_deref() == Some(q.id.as_str()) {
            return;
        }
        let mut missed = 0;
        self.v = self.vectors(q, weak, &mut missed);
        self.missing_vectors += missed;
        Self::features_into(
            &self.cfg,
            &mut self.featurizer,
            q,
            weak,
            dense_of(&self.v, &self.dense_prompt, &self.dense_answer),
            &mut self.x_prompt,
            &mut self.x_answer,
        );
        self.x_of = Some(q.id.clone());
    }

    /// Prompt features (for the strong model's chance) and prompt + answer features (for the weak
    /// answer's), written into caller-owned buffers so a shared, read-only model can score.
    /// `dense`: the prompt's and the answer's vectors with their components' feature indices.
    fn features_into(
        cfg: &CascadeConfig,
        f: &mut Featurizer,
        q: &Query,
        weak: &Answer,
        dense: [Option<(&[f32], &[u32])>; 2],
        x_prompt: &mut FeatureVec,
        x_answer: &mut FeatureVec,
    ) {
        let prompt = q.routing_text();
        x_prompt.clear();
        f.add_bias(x_prompt);
        f.add_text(ns::PROMPT, prompt, cfg.prompt_text, 1.0, x_prompt);
        let [dense_prompt, dense_answer] = dense.map(|d| d.filter(|_| cfg.embedding > 0.0));
        if let Some((v, at)) = dense_prompt {
            for (&i, &c) in at.iter().zip(v) {
                x_prompt.push(i, c * cfg.embedding);
            }
        }
        x_answer.clear();
        x_answer.extend_from(x_prompt);
        if let Some((v, at)) = dense_answer {
            for (&i, &c) in at.iter().zip(v) {
                x_answer.push(i, c * cfg.embedding);
            }
        }
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

    /// The linear estimates (weak answer right, strong model right) mixed with the neighbours'
    /// where the scorer has both.
    fn mixed(&self, x_answer: &FeatureVec, x_prompt: &FeatureVec, v: &Vectors) -> (f32, f32) {
        let (mut pw, mut ps) = (self.weak.prob1(x_answer), self.strong.prob1(x_prompt));
        if let Some(ev) = &self.evidence {
            if let Some(a) = v.answer.as_deref() {
                pw = ev.stack[0].mix(pw, ev.memory[0].estimate(a).0);
            }
            if let Some(p) = v.prompt.as_deref() {
                ps = ev.stack[1].mix(ps, ev.memory[1].estimate(p).0);
            }
        }
        (pw, ps)
    }

    /// The escalation gain (strong's chance less the weak answer's) from a shared, read-only model.
    pub fn score_ref(&self, q: &Query, weak: &Answer, s: &mut Scratch) -> f32 {
        let v = self.vectors(q, weak, &mut 0);
        Self::features_into(
            &self.cfg,
            &mut s.featurizer,
            q,
            weak,
            dense_of(&v, &self.dense_prompt, &self.dense_answer),
            &mut s.a,
            &mut s.b,
        );
        let (pw, ps) = self.mixed(&s.b, &s.a, &v);
        ps - pw
    }

    /// Buffers for [`Self::score_ref`].
    pub fn scratch(&self) -> Result<Scratch, CoreError> {
        Scratch::new(self.cfg.bits)
    }

    /// Its features and learning rate (what a checkpoint must be loaded with).
    pub fn config(&self) -> CascadeConfig {
        self.cfg
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

    /// Reads a checkpoint [`ResponseCascade::save`] wrote. As the router's
    /// ([`super::router::GainRouter::load`]), the neighbour memory is optional both ways: a
    /// checkpoint without one loads with an empty memory into settings with kNN, and one with a
    /// memory loads into settings without kNN (the memory is dropped).
    pub fn load(cfg: CascadeConfig, r: &mut &[u8]) -> Result<Self, CoreError> {
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
        if !r.starts_with(crate::embed::EVIDENCE_MAGIC) {
            // Saved without vectors (or before them): the memory, if any, starts empty.
        } else if c.evidence.is_none() {
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
            c.evidence = Some(ev);
        }
        Ok(c)
    }

    /// Estimated chances that the weak answer is right and that the strong model would be.
    pub fn probabilities(&mut self, q: &Query, weak: &Answer) -> (f32, f32) {
        self.featurize(q, weak);
        self.mixed(&self.x_answer, &self.x_prompt, &self.v)
    }

    /// Teaches the linear models alone: a later pass over items the neighbour memory (and its
    /// stackers) already learned, which would otherwise find each item as its own neighbour.
    pub fn learn_linear(&mut self, q: &Query, weak: &Answer, observed: &Observation) {
        self.featurize(q, weak);
        if let Some(y) = observed.weak {
            learn_outcome(&mut self.weak, &self.x_answer, y);
        }
        if let Some(y) = observed.strong {
            learn_outcome(&mut self.strong, &self.x_prompt, y);
        }
    }
}

/// Each vector (the prompt's, the answer's) with its components' feature indices.
fn dense_of<'a>(
    v: &'a Vectors,
    prompt: &'a [u32],
    answer: &'a [u32],
) -> [Option<(&'a [f32], &'a [u32])>; 2] {
    [
        v.prompt.as_deref().map(|p| (p, prompt)),
        v.answer.as_deref().map(|a| (a, answer)),
    ]
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
        // The stackers learn from the estimates as they stood before this outcome was learned.
        if let Some(ev) = &mut self.evidence {
            for (arm, y, model, x, v) in [
                (0, observed.weak, &self.weak, &self.x_answer, &self.v.answer),
                (
                    1,
                    observed.strong,
                    &self.strong,
                    &self.x_prompt,
                    &self.v.prompt,
                ),
            ] {
                if let (Some(y), Some(v)) = (y, v.as_deref()) {
                    let knn = ev.memory[arm].estimate(v).0;
                    ev.stack[arm].learn(model.prob1(x), knn, y);
                    ev.memory[arm].add(v, y);
                }
            }
        }
        self.learn_linear(q, weak, observed);
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

    /// Word problems whose prompts and answers say nothing in words (fresh numbers each) but
    /// whose answers' vectors fall in two clusters: the weak answer is wrong in the first.
    fn clustered(
        n: usize,
    ) -> (
        Arc<crate::embed::EmbeddingTable>,
        Vec<(Query, Answer, bool)>,
    ) {
        let mut table = crate::embed::EmbeddingTable::new("test", 8).unwrap();
        let mut out = Vec::new();
        for i in 0..n {
            let wrong = i % 3 == 0;
            let prompt = format!("problem {}", 7919 * i + 13);
            let text = format!("the answer is {}", 104_729 * i + 7);
            let mut p = [0.0f32; 8];
            p[2 + i % 6] = 1.0;
            let mut a = [0.0f32; 8];
            a[if wrong { 0 } else { 1 }] = 1.0;
            // A little spread, so no two vectors are equal.
            a[2 + i % 6] = 0.1 + (i % 7) as f32 * 0.02;
            table.insert(&prompt, &p).unwrap();
            table.insert(&text, &a).unwrap();
            out.push((Query::text(format!("q{i}"), prompt), answer(&text), wrong));
        }
        (Arc::new(table), out)
    }

    fn seen(wrong: bool) -> Observation {
        Observation {
            weak: Some(if wrong { 0.0 } else { 1.0 }),
            strong: Some(1.0),
        }
    }

    #[test]
    fn the_answers_vector_carries_what_its_words_do_not() {
        let (table, items) = clustered(700);
        let (train, test) = items.split_at(600);
        let mut plain = ResponseCascade::new(CascadeConfig::default()).unwrap();
        let mut with = ResponseCascade::new(CascadeConfig::default().with_embeddings(8))
            .unwrap()
            .with_embedder(table.clone())
            .unwrap();
        for (q, a, wrong) in train {
            for c in [&mut plain, &mut with] {
                let _ = c.score(q, a);
                c.learn(q, a, &seen(*wrong));
            }
        }
        // Mean score gap between unseen wrong and right answers.
        let gap = |c: &mut ResponseCascade| {
            let (mut w, mut r, mut nw, mut nr) = (0.0, 0.0, 0, 0);
            for (q, a, wrong) in test {
                let s = c.score(q, a);
                if *wrong {
                    w += s;
                    nw += 1;
                } else {
                    r += s;
                    nr += 1;
                }
            }
            w / nw as f32 - r / nr as f32
        };
        let (g_plain, g_with) = (gap(&mut plain), gap(&mut with));
        assert!(
            g_with > 0.6 && g_plain < 0.2,
            "with vectors {g_with}, words alone {g_plain}"
        );
        assert_eq!(with.missing_vectors, 0);
        // An answer the encoder has no vector for is scored on its words, and counted.
        let _ = with.score(&Query::text("new", "problem 1"), &answer("never embedded"));
        assert_eq!(with.missing_vectors, 2);
    }

    #[test]
    fn a_cascade_on_vectors_round_trips_with_and_without_its_memory() {
        let (table, items) = clustered(100);
        let cfg = CascadeConfig {
            bits: 12,
            ..CascadeConfig::default().with_embeddings(8)
        };
        assert!(ResponseCascade::new(cfg.with_embeddings(16))
            .unwrap()
            .with_embedder(table.clone())
            .is_err());
        let mut c = ResponseCascade::new(cfg)
            .unwrap()
            .with_embedder(table.clone())
            .unwrap();
        for (q, a, wrong) in &items {
            c.learn(q, a, &seen(*wrong));
        }
        let mut buf = Vec::new();
        c.save(&mut buf).unwrap();
        let back = ResponseCascade::load(cfg, &mut buf.as_slice())
            .unwrap()
            .with_embedder(table)
            .unwrap();
        let mut scratch = c.scratch().unwrap();
        for (q, a, _) in items.iter().take(10) {
            assert_eq!(back.score_ref(q, a, &mut scratch), c.score(q, a));
        }
        // Saved without vectors: loads into settings with kNN (an empty memory); saved with a
        // memory: loads into settings without kNN (dropped); the linear models carry over.
        let plain = CascadeConfig {
            bits: 12,
            ..CascadeConfig::default()
        };
        let plain_len = {
            let mut b = Vec::new();
            ResponseCascade::new(plain).unwrap().save(&mut b).unwrap();
            b.len()
        };
        let mut head = &buf[..plain_len];
        let fresh = ResponseCascade::load(cfg, &mut head).unwrap();
        assert!(head.is_empty());
        assert_eq!(fresh.evidence.as_ref().unwrap().memory[0].len(), 0);
        let mut all = buf.as_slice();
        let dropped = ResponseCascade::load(plain, &mut all).unwrap();
        assert!(all.is_empty() && dropped.evidence.is_none());
        let (q, a, _) = &items[0];
        let mut s = c.scratch().unwrap();
        ResponseCascade::features_into(
            &plain,
            &mut s.featurizer,
            q,
            a,
            [None, None],
            &mut s.a,
            &mut s.b,
        );
        assert_eq!(dropped.weak.prob1(&s.b), c.weak.prob1(&s.b));
        // A damaged memory is refused; kNN without the vectors' length too.
        assert!(ResponseCascade::load(cfg, &mut &buf[..buf.len() - 3]).is_err());
        let bad = CascadeConfig {
            knn: 8,
            ..CascadeConfig::default()
        };
        assert!(ResponseCascade::new(bad).is_err());
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
