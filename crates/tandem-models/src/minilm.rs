//! all-MiniLM-L6-v2 in-process: the `tokenizers` crate (padding to the longest sentence of the
//! batch, not to 128), mean pooling over real tokens, L2-normalised. Two backends run the BERT:
//!
//! - `ort`: the int8 ONNX graph that `scripts/setup-onnx` builds from the same safetensors, run by
//!   ONNX Runtime loaded from the pinned PyPI wheel's library (both in `$TANDEM_HOME/assets/
//!   minilm-onnx`); 1.6-2.3x candle's speed, cosine to candle's vectors 0.995 on average but
//!   down to 0.987 on some short texts (ENCODER.md), so it is chosen with `TANDEM_ENCODER=ort`.
//! - `candle`: candle's BERT in f32, the default.

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
    #[error("TANDEM_ENCODER={0}: expected candle or ort (ort needs the `ort` feature)")]
    Backend(String),
}

impl From<candle_core::Error> for EncoderError {
    fn from(e: candle_core::Error) -> Self {
        EncoderError::Run(e.to_string())
    }
}

enum Backend {
    Candle(Box<BertModel>),
    #[cfg(feature = "ort")]
    Ort(ort_backend::OrtBert),
}

/// Where `scripts/setup-onnx` puts the ONNX Runtime library and graphs: beside the MiniLM asset.
pub fn onnx_dir(minilm_dir: &Path) -> std::path::PathBuf {
    minilm_dir.with_file_name("minilm-onnx")
}

/// The backend `MiniLm::load` uses: "candle" unless `TANDEM_ENCODER=ort` asks for the int8 ONNX
/// Runtime one (cache files name it, as the two give slightly different vectors).
pub fn backend_choice() -> Result<&'static str, EncoderError> {
    match std::env::var("TANDEM_ENCODER").ok().as_deref() {
        None | Some("") | Some("candle") => Ok("candle"),
        #[cfg(feature = "ort")]
        Some("ort") => Ok("ort"),
        Some(other) => Err(EncoderError::Backend(other.to_string())),
    }
}

pub struct MiniLm {
    backend: Backend,
    tokenizer: Tokenizer,
    device: Device,
    pub max_tokens: usize,
    /// Inputs cut to `max_tokens` so far (reported, never silent).
    pub truncated: u64,
    pub dim: usize,
}

impl MiniLm {
    /// Loads from a directory holding `model.safetensors`, `tokenizer.json` and `config.json`,
    /// with the backend `backend_choice()` names.
    pub fn load(dir: &Path, max_tokens: usize) -> Result<Self, EncoderError> {
        match backend_choice()? {
            #[cfg(feature = "ort")]
            "ort" => Self::load_ort(dir, max_tokens),
            _ => Self::load_candle(dir, max_tokens),
        }
    }

    /// The int8 ONNX Runtime backend; fails, naming the file, when it is not installed.
    #[cfg(feature = "ort")]
    pub fn load_ort(dir: &Path, max_tokens: usize) -> Result<Self, EncoderError> {
        let model = ort_backend::OrtBert::load(&onnx_dir(dir), ort_backend::INT8)?;
        let (tokenizer, dim) = Self::tokenizer(dir, max_tokens)?;
        Ok(MiniLm {
            backend: Backend::Ort(model),
            tokenizer,
            device: Device::Cpu,
            max_tokens,
            truncated: 0,
            dim,
        })
    }

    /// The f32 ONNX graph through ONNX Runtime (the Python reference's model, for the bench).
    #[cfg(feature = "ort")]
    pub fn load_ort_f32(dir: &Path, max_tokens: usize) -> Result<Self, EncoderError> {
        let mut m = Self::load_ort(dir, max_tokens)?;
        m.backend = Backend::Ort(ort_backend::OrtBert::load(
            &onnx_dir(dir),
            ort_backend::F32,
        )?);
        Ok(m)
    }

    /// "ort" or "candle".
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Candle(_) => "candle",
            #[cfg(feature = "ort")]
            Backend::Ort(_) => "ort",
        }
    }

    fn tokenizer(dir: &Path, max_tokens: usize) -> Result<(Tokenizer, usize), EncoderError> {
        let load_err = |p: &Path, m: String| EncoderError::Load {
            path: p.display().to_string(),
            message: m,
        };
        let cfg_path = dir.join("config.json");
        let cfg_text =
            std::fs::read_to_string(&cfg_path).map_err(|e| load_err(&cfg_path, e.to_string()))?;
        let config: Config =
            serde_json::from_str(&cfg_text).map_err(|e| load_err(&cfg_path, e.to_string()))?;
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
        Ok((tokenizer, config.hidden_size))
    }

    /// candle's f32 BERT, whatever is installed.
    pub fn load_candle(dir: &Path, max_tokens: usize) -> Result<Self, EncoderError> {
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
        let (tokenizer, dim) = Self::tokenizer(dir, max_tokens)?;
        Ok(MiniLm {
            backend: Backend::Candle(Box::new(model)),
            tokenizer,
            device,
            max_tokens,
            truncated: 0,
            dim,
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
        // Without the `ort` feature the match has one arm.
        #[allow(clippy::infallible_destructuring_match)]
        let model = match &mut self.backend {
            Backend::Candle(m) => m,
            #[cfg(feature = "ort")]
            Backend::Ort(m) => {
                let wide = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<i64> {
                    enc.iter()
                        .flat_map(|e| f(e).iter().map(|&x| i64::from(x)))
                        .collect()
                };
                return m.embed(
                    wide(&|e| e.get_ids()),
                    wide(&|e| e.get_attention_mask()),
                    wide(&|e| e.get_type_ids()),
                    (n, len),
                    self.dim,
                );
            }
        };
        let ids = Tensor::from_vec(flat(&|e| e.get_ids()), (n, len), &self.device)?;
        let types = Tensor::from_vec(flat(&|e| e.get_type_ids()), (n, len), &self.device)?;
        let mask = Tensor::from_vec(flat(&|e| e.get_attention_mask()), (n, len), &self.device)?;
        let hidden = model.forward(&ids, &types, Some(&mask))?;
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

#[cfg(feature = "ort")]
mod ort_backend {
    use super::EncoderError;
    use ort::session::builder::GraphOptimizationLevel;
    use ort::session::Session;
    use ort::value::Tensor;
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    /// The library taken from the pinned onnxruntime wheel (scripts/setup-onnx).
    pub const LIBRARY: &str = "libonnxruntime.so.1.31.1";
    pub const INT8: &str = "model.int8.onnx";
    pub const F32: &str = "model.onnx";

    /// One ONNX Runtime environment per process (the library allows no second one).
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

    fn environment(lib: &Path) -> Result<ort::environment::Environment, EncoderError> {
        let load_err = |message: String| EncoderError::Load {
            path: lib.display().to_string(),
            message,
        };
        if !lib.is_file() {
            return Err(load_err(
                "not installed: run scripts/setup-onnx (or set TANDEM_ENCODER=candle)".into(),
            ));
        }
        ENV.get_or_init(|| {
            ort::init_from(lib)
                .map_err(|e| e.to_string())?
                .with_name("tandem")
                .build()
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(load_err)
    }

    pub struct OrtBert {
        session: Session,
        path: PathBuf,
    }

    impl OrtBert {
        pub fn load(dir: &Path, file: &str) -> Result<Self, EncoderError> {
            let env = environment(&dir.join(LIBRARY))?;
            let path = dir.join(file);
            let load_err = |message: String| EncoderError::Load {
                path: path.display().to_string(),
                message,
            };
            if !path.is_file() {
                return Err(load_err(
                    "not installed: run scripts/setup-onnx (or set TANDEM_ENCODER=candle)".into(),
                ));
            }
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let session = Session::builder(&env)
                .map_err(|e| load_err(e.to_string()))?
                .with_optimization_level(GraphOptimizationLevel::All)
                .map_err(|e| load_err(e.to_string()))?
                .with_intra_threads(threads)
                .map_err(|e| load_err(e.to_string()))?
                .commit_from_file(&path)
                .map_err(|e| load_err(e.to_string()))?;
            Ok(OrtBert { session, path })
        }

        /// Unit-length sentence embeddings of one padded batch (`shape` = (sentences, tokens)).
        pub fn embed(
            &mut self,
            ids: Vec<i64>,
            mask: Vec<i64>,
            types: Vec<i64>,
            shape: (usize, usize),
            dim: usize,
        ) -> Result<Vec<Vec<f32>>, EncoderError> {
            let run_err =
                |e: ort::Error| EncoderError::Run(format!("{}: {e}", self.path.display()));
            let s = [shape.0, shape.1];
            let ids = Tensor::from_array((s, ids)).map_err(run_err)?;
            let mask = Tensor::from_array((s, mask)).map_err(run_err)?;
            let types = Tensor::from_array((s, types)).map_err(run_err)?;
            let out = self
                .session
                .run(ort::inputs![
                    "input_ids" => ids,
                    "attention_mask" => mask,
                    "token_type_ids" => types,
                ])
                .map_err(|e| EncoderError::Run(format!("{}: {e}", self.path.display())))?;
            let (_, flat) = out
                .get("sentence_embedding")
                .ok_or_else(|| {
                    EncoderError::Run(format!(
                        "{}: no output sentence_embedding",
                        self.path.display()
                    ))
                })?
                .try_extract_tensor::<f32>()
                .map_err(|e| EncoderError::Run(format!("{}: {e}", self.path.display())))?;
            if flat.len() != shape.0 * dim {
                return Err(EncoderError::Run(format!(
                    "{}: {} outputs for {} sentences of {dim}",
                    self.path.display(),
                    flat.len(),
                    shape.0
                )));
            }
            Ok(flat.chunks(dim).map(<[f32]>::to_vec).collect())
        }
    }
}
