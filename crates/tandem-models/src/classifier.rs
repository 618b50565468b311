//! Classifier tiers behind one interface: the hashed n-gram learner, the MiniLM encoder with an
//! online softmax head, and a GGUF LLM scoring each label. Cheap tiers learn online, one example at
//! a time, from the labels the top tier gives them.

use crate::gguf::{GgufError, GgufLm};
use crate::minilm::{EncoderError, MiniLm};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
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
    encoder: Option<MiniLm>,
    shared: Option<Arc<EmbeddingCache>>,
    head: OnlineSoftmax,
    /// Embeddings computed ahead in batches, by text.
    ready: HashMap<String, (Vec<f32>, Duration)>,
    batch: usize,
    x: FeatureVec,
    probs: Vec<f32>,
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
            encoder,
            shared,
            head: OnlineSoftmax::new(cfg)?,
            ready: HashMap::new(),
            batch: batch.max(1),
            x: FeatureVec::default(),
            probs: vec![0.0; classes],
        })
    }

    pub fn truncated(&self) -> u64 {
        self.encoder.as_ref().map_or(0, |e| e.truncated)
    }

    fn embedding(&mut self, text: &str) -> Result<(Vec<f32>, Duration), ModelError> {
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
        self.ready.remove(text);
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
        self.ready.remove(text);
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
