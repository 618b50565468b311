//! all-MiniLM-L6-v2 in-process: the `tokenizers` crate (padding to the longest sentence of the
//! batch, not to 128) and candle's BERT in f32, mean pooling over real tokens, L2-normalised.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use std::path::Path;
use thiserror::Error;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

#[derive(Debug, Error)]
pub enum EncoderError {
    #[error("{path}: {message}")]
    Load { path: String, message: String },
    #[error("encoding failed: {0}")]
    Run(String),
}

impl From<candle_core::Error> for EncoderError {
    fn from(e: candle_core::Error) -> Self {
        EncoderError::Run(e.to_string())
    }
}

pub struct MiniLm {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    pub max_tokens: usize,
    /// Inputs cut to `max_tokens` so far (reported, never silent).
    pub truncated: u64,
    pub dim: usize,
}

impl MiniLm {
    /// Loads from a directory holding `model.safetensors`, `tokenizer.json` and `config.json`.
    pub fn load(dir: &Path, max_tokens: usize) -> Result<Self, EncoderError> {
        let load_err = |p: &Path, m: String| EncoderError::Load {
            path: p.display().to_string(),
            message: m,
        };
        let cfg_path = dir.join("config.json");
        let cfg_text =
            std::fs::read_to_string(&cfg_path).map_err(|e| load_err(&cfg_path, e.to_string()))?;
        let config: Config =
            serde_json::from_str(&cfg_text).map_err(|e| load_err(&cfg_path, e.to_string()))?;
        let weights_path = dir.join("model.safetensors");
        let bytes =
            std::fs::read(&weights_path).map_err(|e| load_err(&weights_path, e.to_string()))?;
        let device = Device::Cpu;
        let vb =
            VarBuilder::from_buffered_safetensors(bytes, DType::F32, &device).map_err(|e| {
                load_err(
                    &weights_path,
                    format!("not a valid safetensors file (truncated?): {e}"),
                )
            })?;
        let model =
            BertModel::load(vb, &config).map_err(|e| load_err(&weights_path, e.to_string()))?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| load_err(&tok_path, e.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| load_err(&tok_path, e.to_string()))?;
        Ok(MiniLm {
            model,
            tokenizer,
            device,
            max_tokens,
            truncated: 0,
            dim: config.hidden_size,
        })
    }

    /// Sentence embeddings, one per input, unit length.
    pub fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EncoderError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EncoderError::Run(e.to_string()))?;
        self.truncated += enc
            .iter()
            .filter(|e| !e.get_overflowing().is_empty())
            .count() as u64;
        let n = enc.len();
        let len = enc.first().map_or(0, |e| e.get_ids().len());
        let flat = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            enc.iter().flat_map(|e| f(e).to_vec()).collect()
        };
        let ids = Tensor::from_vec(flat(&|e| e.get_ids()), (n, len), &self.device)?;
        let types = Tensor::from_vec(flat(&|e| e.get_type_ids()), (n, len), &self.device)?;
        let mask = Tensor::from_vec(flat(&|e| e.get_attention_mask()), (n, len), &self.device)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&m)?.sum(1)?;
        let counts = m.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?.to_vec2::<f32>()?)
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb).max(1e-12)
}
