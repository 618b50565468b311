//! Classifier tiers behind one interface: the hashed n-gram learner, the MiniLM encoder with an
//! online softmax head, and a GGUF LLM scoring each label. Cheap tiers learn online, one example at
//! a time, from the labels the top tier gives them.

use crate::gguf::{GgufError, GgufLm};
use crate::minilm::{EncoderError, MiniLm};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::embed::LabelMemory;
use tandem_core::features::{ns, FeatureVec, Featurizer, TextFeatures};
use tandem_core::learner::{LearnerConfig, OnlineSoftmax};
use tandem_core::{CoreError, Message};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error(transparent)]
    Asset(#[from] crate::assets::AssetError),
    #[error("no precomputed embedding for {0:?} and no encoder loaded to compute it")]
    NoEmbedding(String),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
}

/// A tier's class distribution for one input.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub probs: Vec<f32>,
    pub logits: Vec<f32>,
    pub compute: Duration,
}

impl Prediction {
    pub fn label(&self) -> usize {
        argmax(&self.probs)
    }

    pub fn confidence(&self) -> f32 {
        self.probs.iter().copied().fold(0.0, f32::max)
    }
}

pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0
}

pub trait Classifier: Send {
    /// Called with the texts about to be classified, so batched encoders can work ahead.
    fn prepare(&mut self, _texts: &[&str]) -> Result<(), ModelError> {
        Ok(())
    }
    fn predict(&mut self, text: &str) -> Result<Prediction, ModelError>;
    /// Learns one labelled example; `weight` scales its step. Tiers that do not learn ignore it.
    fn learn(&mut self, text: &str, label: usize, weight: f32) -> Result<(), ModelError>;
    fn learns(&self) -> bool;
    /// Examples learned so far.
    fn updates(&self) -> u64;
    fn save(&self, _path: &Path) -> Result<(), ModelError> {
        Ok(())
    }
    fn load(&mut self, _path: &Path) -> Result<(), ModelError> {
        Ok(())
    }
    /// Drops anything prepared for `text` that will not be used (the item was answered without
    /// this tier learning from it).
    fn forget(&mut self, _text: &str) {}
}

fn save_learner(m: &OnlineSoftmax, path: &Path) -> Result<(), ModelError> {
    let err = |e: std::io::Error| ModelError::Checkpoint {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(err)?);
    m.save(&mut f).map_err(err)?;
    let f = f.into_inner().map_err(|e| err(e.into_error()))?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn load_learner(path: &Path, want: LearnerConfig) -> Result<OnlineSoftmax, ModelError> {
    let err = |m: String| ModelError::Checkpoint {
        path: path.display().to_string(),
        message: m,
    };
    let f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let m = OnlineSoftmax::load(&mut std::io::BufReader::new(f)).map_err(|e| err(e.to_string()))?;
    if m.config().bits != want.bits || m.classes() != want.classes {
        return Err(err(format!(
            "holds {} classes over 2^{} features, the configuration wants {} over 2^{}",
            m.classes(),
            m.config().bits,
            want.classes,
            want.bits
        )));
    }
    Ok(m)
}

/// The hashed n-gram online softmax learner.
pub struct HashedClassifier {
    featurizer: Featurizer,
    text: TextFeatures,
    model: OnlineSoftmax,
    x: FeatureVec,
    probs: Vec<f32>,
}

impl HashedClassifier {
    pub fn new(
        classes: usize,
        bits: u32,
        text: TextFeatures,
        learning_rate: f32,
    ) -> Result<Self, ModelError> {
        let cfg = LearnerConfig {
            bits,
            classes,
            learning_rate,
            l2: 0.0,
        };
        Ok(HashedClassifier {
            featurizer: Featurizer::new(bits)?,
            text,
            model: OnlineSoftmax::new(cfg)?,
            x: FeatureVec::default(),
            probs: vec![0.0; classes],
        })
    }

    fn featurize(&mut self, text: &str) {
        self.x.clear();
        self.featurizer.add_bias(&mut self.x);
        self.featurizer
            .add_text(ns::PROMPT, text, self.text, 1.0, &mut self.x);
    }
}

impl Classifier for HashedClassifier {
    fn predict(&mut self, text: &str) -> Result<Prediction, ModelError> {
        let t0 = Instant::now();
        self.featurize(text);
        let mut logits = vec![0.0; self.model.classes()];
        self.model.logits(&self.x, &mut logits);
        let mut probs = logits.clone();
        tandem_core::learner::softmax_in_place(&mut probs);
        Ok(Prediction {
            probs,
            logits,
            compute: t0.elapsed(),
        })
    }

    fn learn(&mut self, text: &str, label: usize, weight: f32) -> Result<(), ModelError> {
        self.featurize(text);
        self.model.learn(&self.x, label, weight, &mut self.probs);
        Ok(())
    }

    fn learns(&self) -> bool {
        true
    }

    fn updates(&self) -> u64 {
        self.model.updates()
    }

    fn save(&self, path: &Path) -> Result<(), ModelError> {
        save_learner(&self.model, path)
    }

    fn load(&mut self, path: &Path) -> Result<(), ModelError> {
        self.model = load_learner(path, self.model.config())?;
        Ok(())
    }
}

/// Embeddings computed once (with the time each took), shared by many heads: a benchmark runs
/// dozens of cascades over the same texts, and the frozen encoder gives the same vectors each time.
pub type EmbeddingCache = HashMap<String, (Vec<f32>, Duration)>;

/// MiniLM sentence embeddings with an online softmax head over the 384 dimensions.
pub struct MiniLmHead {
    vectors: Vectors,
    head: OnlineSoftmax,
    x: FeatureVec,
    probs: Vec<f32>,
}

/// Where a MiniLM tier's sentence vectors come from: computed ahead in batches by its encoder,
/// or looked up in a shared cache (a benchmark's), with the time each took.
struct Vectors {
    encoder: Option<MiniLm>,
    shared: Option<Arc<EmbeddingCache>>,
    /// Embeddings computed ahead in batches, by text.
    ready: HashMap<String, (Vec<f32>, Duration)>,
    batch: usize,
}

impl Vectors {
    fn get(&mut self, text: &str) -> Result<(Vec<f32>, Duration), ModelError> {
        if let Some(e) = self.ready.get(text) {
            return Ok(e.clone());
        }
        if let Some(e) = self.shared.as_ref().and_then(|s| s.get(text)) {
            return Ok(e.clone());
        }
        let Some(encoder) = self.encoder.as_mut() else {
            return Err(ModelError::NoEmbedding(text.chars().take(60).collect()));
        };
        let t0 = Instant::now();
        let e = encoder.embed(&[text])?.pop().unwrap_or_default();
        let d = t0.elapsed();
        self.ready.insert(text.to_string(), (e.clone(), d));
        Ok((e, d))
    }

    fn prepare(&mut self, texts: &[&str]) -> Result<(), ModelError> {
        let mut todo: Vec<&str> = texts
            .iter()
            .copied()
            .filter(|t| {
                !self.ready.contains_key(*t)
                    && !self.shared.as_ref().is_some_and(|s| s.contains_key(*t))
            })
            .collect();
        let Some(encoder) = self.encoder.as_mut() else {
            return Ok(()); // predict names the first text it cannot embed
        };
        // Batches of similar length waste little on padding to the longest.
        todo.sort_by_key(|t| t.len());
        todo.dedup();
        for chunk in todo.chunks(self.batch) {
            let t0 = Instant::now();
            let embs = encoder.embed(chunk)?;
            let each = t0.elapsed() / chunk.len().max(1) as u32;
            for (t, e) in chunk.iter().zip(embs) {
                self.ready.insert((*t).to_string(), (e, each));
            }
        }
        Ok(())
    }

    fn forget(&mut self, text: &str) {
        self.ready.remove(text);
    }

    fn truncated(&self) -> u64 {
        self.encoder.as_ref().map_or(0, |e| e.truncated)
    }
}

impl MiniLmHead {
    pub fn new(
        encoder: MiniLm,
        classes: usize,
        learning_rate: f32,
        batch: usize,
    ) -> Result<Self, ModelError> {
        Self::build(Some(encoder), None, classes, learning_rate, batch)
    }

    /// A head over precomputed embeddings only (no encoder): a text missing from `shared` is an error.
    pub fn over_embeddings(
        shared: Arc<EmbeddingCache>,
        classes: usize,
        learning_rate: f32,
    ) -> Result<Self, ModelError> {
        Self::build(None, Some(shared), classes, learning_rate, 1)
    }

    fn build(
        encoder: Option<MiniLm>,
        shared: Option<Arc<EmbeddingCache>>,
        classes: usize,
        learning_rate: f32,
        batch: usize,
    ) -> Result<Self, ModelError> {
        let cfg = LearnerConfig {
            bits: 10,
            classes,
            learning_rate,
            l2: 0.0,
        };
        Ok(MiniLmHead {
            vectors: Vectors {
                encoder,
                shared,
                ready: HashMap::new(),
                batch: batch.max(1),
            },
            head: OnlineSoftmax::new(cfg)?,
            x: FeatureVec::default(),
            probs: vec![0.0; classes],
        })
    }

    pub fn truncated(&self) -> u64 {
        self.vectors.truncated()
    }

    fn embedding(&mut self, text: &str) -> Result<(Vec<f32>, Duration), ModelError> {
        self.vectors.get(text)
    }

    fn features(&mut self, emb: &[f32]) {
        self.x.clear();
        // Index 0 is the bias; dimension i sits at index i + 1 (all < 2^10).
        self.x.push(0, 1.0);
        for (i, v) in emb.iter().enumerate() {
            // Unit-length embeddings have tiny coordinates; scale them to about unit variance.
            self.x.push(i as u32 + 1, v * 8.0);
        }
    }
}

impl Classifier for MiniLmHead {
    fn prepare(&mut self, texts: &[&str]) -> Result<(), ModelError> {
        self.vectors.prepare(texts)
    }

    fn predict(&mut self, text: &str) -> Result<Prediction, ModelError> {
        let (emb, compute) = self.embedding(text)?;
        let t0 = Instant::now();
        self.features(&emb);
        let mut logits = vec![0.0; self.head.classes()];
        self.head.logits(&self.x, &mut logits);
        let mut probs = logits.clone();
        tandem_core::learner::softmax_in_place(&mut probs);
        Ok(Prediction {
            probs,
            logits,
            compute: compute + t0.elapsed(),
        })
    }

    fn learn(&mut self, text: &str, label: usize, weight: f32) -> Result<(), ModelError> {
        let (emb, _) = self.embedding(text)?;
        self.features(&emb);
        self.head.learn(&self.x, label, weight, &mut self.probs);
        // The embedding is not needed once the item has been learned.
        self.vectors.forget(text);
        Ok(())
    }

    fn learns(&self) -> bool {
        true
    }

    fn updates(&self) -> u64 {
        self.head.updates()
    }

    fn save(&self, path: &Path) -> Result<(), ModelError> {
        save_learner(&self.head, path)
    }

    fn load(&mut self, path: &Path) -> Result<(), ModelError> {
        self.head = load_learner(path, self.head.config())?;
        Ok(())
    }

    fn forget(&mut self, text: &str) {
        self.vectors.forget(text);
    }
}

/// all-MiniLM-L6-v2's vector length (what a shared embedding cache holds).
const MINILM_DIM: usize = 384;

/// A nearest-neighbour tier over MiniLM vectors: it remembers the vectors of the items it learned
/// (their gold labels, or the top tier's answers) and answers with the similarity-weighted vote of
/// the `k` nearest, confident only where close neighbours agree (`tandem_core::embed::LabelMemory`).
pub struct KnnTier {
    dim: usize,
    vectors: Vectors,
    memory: LabelMemory,
    classes: usize,
    updates: u64,
}

impl KnnTier {
    /// `memory`: labelled vectors remembered (the oldest are forgotten); `k`: neighbours voting.
    pub fn new(
        encoder: MiniLm,
        classes: usize,
        memory: usize,
        k: usize,
        batch: usize,
    ) -> Result<Self, ModelError> {
        Self::build(Some(encoder), None, classes, memory, k, batch)
    }

    /// A tier over precomputed embeddings only (no encoder): a text missing from `shared` is an
    /// error.
    pub fn over_embeddings(
        shared: Arc<EmbeddingCache>,
        classes: usize,
        memory: usize,
        k: usize,
    ) -> Result<Self, ModelError> {
        Self::build(None, Some(shared), classes, memory, k, 1)
    }

    fn build(
        encoder: Option<MiniLm>,
        shared: Option<Arc<EmbeddingCache>>,
        classes: usize,
        memory: usize,
        k: usize,
        batch: usize,
    ) -> Result<Self, ModelError> {
        let dim = encoder.as_ref().map_or(MINILM_DIM, |e| e.dim);
        Ok(KnnTier {
            dim,
            vectors: Vectors {
                encoder,
                shared,
                ready: HashMap::new(),
                batch: batch.max(1),
            },
            memory: LabelMemory::new(dim, memory, k, classes)?,
            classes,
            updates: 0,
        })
    }
}

impl Classifier for KnnTier {
    fn prepare(&mut self, texts: &[&str]) -> Result<(), ModelError> {
        self.vectors.prepare(texts)
    }

    fn predict(&mut self, text: &str) -> Result<Prediction, ModelError> {
        let (emb, compute) = self.vectors.get(text)?;
        let t0 = Instant::now();
        let mut probs = vec![0.0; self.classes];
        self.memory.probabilities(&emb, &mut probs);
        // Log-probabilities as logits, so energy-based deferral reads the votes too.
        let logits = probs.iter().map(|p| p.max(1e-6).ln()).collect();
        Ok(Prediction {
            probs,
            logits,
            compute: compute + t0.elapsed(),
        })
    }

    fn learn(&mut self, text: &str, label: usize, _weight: f32) -> Result<(), ModelError> {
        let (emb, _) = self.vectors.get(text)?;
        self.memory.add(&emb, label);
        self.updates += 1;
        self.vectors.forget(text);
        Ok(())
    }

    fn learns(&self) -> bool {
        true
    }

    fn updates(&self) -> u64 {
        self.updates
    }

    fn save(&self, path: &Path) -> Result<(), ModelError> {
        let err = |e: std::io::Error| ModelError::Checkpoint {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let tmp = path.with_extension("tmp");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(err)?);
        f.write_all(&self.updates.to_le_bytes()).map_err(err)?;
        self.memory.save(&mut f).map_err(err)?;
        let f = f.into_inner().map_err(|e| err(e.into_error()))?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    fn load(&mut self, path: &Path) -> Result<(), ModelError> {
        let err = |m: String| ModelError::Checkpoint {
            path: path.display().to_string(),
            message: m,
        };
        let mut r =
            std::io::BufReader::new(std::fs::File::open(path).map_err(|e| err(e.to_string()))?);
        let mut n = [0u8; 8];
        r.read_exact(&mut n).map_err(|e| err(e.to_string()))?;
        self.memory =
            LabelMemory::load(&mut r, self.dim, self.classes).map_err(|e| err(e.to_string()))?;
        self.updates = u64::from_le_bytes(n);
        Ok(())
    }

    fn forget(&mut self, text: &str) {
        self.vectors.forget(text);
    }
}

/// A local instruct LLM classifying zero-shot: the instruction (with `{text}` replaced) as the user
/// turn, each label's verbaliser scored as the assistant's answer.
pub struct LlmClassifier {
    pub lm: GgufLm,
    instruction: String,
    verbalizers: Vec<String>,
}

impl LlmClassifier {
    pub fn new(lm: GgufLm, instruction: String, verbalizers: Vec<String>) -> Self {
        LlmClassifier {
            lm,
            instruction,
            verbalizers,
        }
    }

    pub fn messages(&self, text: &str) -> Vec<Message> {
        self.messages_with_hint(text, "")
    }

    /// The user turn with `hint` (e.g. a smaller model's answer, for S4L) after the instruction.
    pub fn messages_with_hint(&self, text: &str, hint: &str) -> Vec<Message> {
        vec![Message {
            role: "user".into(),
            content: self.instruction.replace("{text}", text) + hint,
        }]
    }

    /// Classifies with a hint appended to the prompt.
    pub fn predict_with_hint(&mut self, text: &str, hint: &str) -> Result<Prediction, ModelError> {
        let t0 = Instant::now();
        let s = self
            .lm
            .classify(&self.messages_with_hint(text, hint), &self.verbalizers)?;
        Ok(Prediction {
            probs: s.probs,
            logits: s.logits,
            compute: t0.elapsed(),
        })
    }

    /// The exact prompt text the model sees, for recording keys.
    pub fn prompt(&self, text: &str) -> Result<String, ModelError> {
        Ok(self.lm.chat_prompt(&self.messages(text))?)
    }
}

impl Classifier for LlmClassifier {
    fn predict(&mut self, text: &str) -> Result<Prediction, ModelError> {
        let t0 = Instant::now();
        let s = self.lm.classify(&self.messages(text), &self.verbalizers)?;
        Ok(Prediction {
            probs: s.probs,
            logits: s.logits,
            compute: t0.elapsed(),
        })
    }

    fn learn(&mut self, _: &str, _: usize, _: f32) -> Result<(), ModelError> {
        Ok(())
    }

    fn learns(&self) -> bool {
        false
    }

    fn updates(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Stand-in vectors: texts "a…" near one direction, "b…" near another, "m…" between them.
    fn cache(n: usize) -> Arc<EmbeddingCache> {
        let mut c = EmbeddingCache::new();
        for i in 0..n {
            let e = (i % 7) as f32 * 0.01;
            for (prefix, x, y) in [("a", 1.0, e), ("b", e, 1.0), ("m", 0.7 + e, 0.7)] {
                let mut v = vec![0.0f32; MINILM_DIM];
                v[0] = x;
                v[1] = y;
                let n = (x * x + y * y).sqrt();
                v.iter_mut().for_each(|c| *c /= n);
                c.insert(format!("{prefix}{i}"), (v, Duration::from_micros(10)));
            }
        }
        Arc::new(c)
    }

    #[test]
    fn the_knn_tier_answers_where_its_neighbours_agree() {
        let mut t = KnnTier::over_embeddings(cache(60), 2, 1000, 8).unwrap();
        // Before learning anything it has no opinion.
        let p = t.predict("a0").unwrap();
        assert!((p.probs[0] - 0.5).abs() < 1e-6, "{:?}", p.probs);
        for i in 0..40 {
            t.learn(&format!("a{i}"), 0, 1.0).unwrap();
            t.learn(&format!("b{i}"), 1, 1.0).unwrap();
            // Between the two, the labels disagree.
            t.learn(&format!("m{i}"), i % 2, 1.0).unwrap();
        }
        assert_eq!(t.updates(), 120);
        let a = t.predict("a50").unwrap();
        let b = t.predict("b50").unwrap();
        let m = t.predict("m50").unwrap();
        assert!(a.probs[0] > 0.85 && b.probs[1] > 0.85, "{a:?} {b:?}");
        assert!(m.probs[0] < 0.75 && m.probs[1] < 0.75, "{m:?}");
        assert!(t.predict("unseen").is_err());

        // A checkpoint restores the memory; one of another class count is refused, named.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("knn.ckpt");
        t.save(&path).unwrap();
        let mut back = KnnTier::over_embeddings(cache(60), 2, 1000, 8).unwrap();
        back.load(&path).unwrap();
        assert_eq!(back.updates(), 120);
        assert_eq!(back.predict("a50").unwrap().probs, a.probs);
        let mut three = KnnTier::over_embeddings(cache(60), 3, 1000, 8).unwrap();
        let e = three.load(&path).unwrap_err().to_string();
        assert!(e.contains("knn.ckpt") && e.contains("classes"), "{e}");
    }
}
