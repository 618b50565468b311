//! Builds the configured tiers: the learners, the encoder head and the LLM (behind its recording).

use crate::config::{RunConfig, TierConfig, TierKind};
use crate::error::RunError;
use crate::recording::RecordingLlm;
use tandem_core::features::TextFeatures;
use tandem_core::Price;
use tandem_models::assets::{find, sha256_file, Store};
use tandem_models::classifier::{Classifier, HashedClassifier, KnnTier, MiniLmHead};
use tandem_models::minilm::MiniLm;

pub enum TierModel {
    Learner(Box<dyn Classifier>),
    Llm(Box<RecordingLlm>),
}

impl TierModel {
    pub fn classifier(&mut self) -> &mut dyn Classifier {
        match self {
            TierModel::Learner(c) => c.as_mut(),
            TierModel::Llm(l) => l.as_mut(),
        }
    }
}

pub struct TierSetup {
    pub name: String,
    pub model: TierModel,
    pub price: Price,
    pub threshold: f32,
    pub warmup: u64,
}

pub fn build(cfg: &RunConfig, store: &Store) -> Result<Vec<TierSetup>, RunError> {
    cfg.tiers.iter().map(|t| build_one(cfg, t, store)).collect()
}

pub fn build_one(cfg: &RunConfig, t: &TierConfig, store: &Store) -> Result<TierSetup, RunError> {
    let classes = cfg.labels.len();
    let model = match t.kind {
        TierKind::Hashed => {
            let text = TextFeatures {
                word_ngrams: 2,
                char_min: 3,
                char_max: 5,
            };
            TierModel::Learner(Box::new(HashedClassifier::new(
                classes,
                t.bits.unwrap_or(20),
                text,
                t.learning_rate.unwrap_or(0.2),
            )?))
        }
        TierKind::Minilm | TierKind::Knn => {
            let dir = store.path("minilm", "config.json")?;
            store.path("minilm", "model.safetensors")?;
            store.path("minilm", "tokenizer.json")?;
            let dir = dir.parent().map(|d| d.to_path_buf()).unwrap_or_default();
            let enc = MiniLm::load(&dir, t.max_tokens.unwrap_or(128))
                .map_err(tandem_models::classifier::ModelError::from)?;
            if t.kind == TierKind::Knn {
                TierModel::Learner(Box::new(KnnTier::new(
                    enc,
                    classes,
                    t.knn_memory(),
                    t.knn_k(),
                    t.batch.unwrap_or(32),
                )?))
            } else {
                TierModel::Learner(Box::new(MiniLmHead::new(
                    enc,
                    classes,
                    t.learning_rate.unwrap_or(0.05),
                    t.batch.unwrap_or(32),
                )?))
            }
        }
        TierKind::Gguf => {
            let (path, sha) = match (&t.asset, &t.path) {
                (Some(id), _) => {
                    let asset = find(id)?;
                    let file = asset
                        .files
                        .iter()
                        .find(|f| f.out.ends_with(".gguf"))
                        .ok_or_else(|| {
                            RunError::Invalid(format!(
                                "tier `{}`: asset `{id}` is not a GGUF model",
                                t.name
                            ))
                        })?;
                    let name = file.out.rsplit('/').next().unwrap_or(file.out);
                    (store.path(id, name)?, file.sha256.to_string())
                }
                (None, Some(p)) => {
                    if !p.exists() {
                        return Err(RunError::Invalid(format!(
                            "tier `{}`: {} does not exist",
                            t.name,
                            p.display()
                        )));
                    }
                    (p.clone(), sha256_file(p)?)
                }
                (None, None) => {
                    return Err(RunError::Invalid(format!("tier `{}`: no model", t.name)))
                }
            };
            let verbalizers = t.verbalizers.clone().unwrap_or_else(|| cfg.labels.clone());
            let instruction = t.instruction.clone().unwrap_or_default();
            TierModel::Llm(Box::new(RecordingLlm::new(
                path,
                sha,
                instruction,
                verbalizers,
                t.recording.as_deref(),
            )?))
        }
    };
    Ok(TierSetup {
        name: t.name.clone(),
        model,
        price: t.price(),
        threshold: t.threshold.unwrap_or(0.9),
        warmup: t.warmup.unwrap_or(100),
    })
}
