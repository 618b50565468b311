//! A local GGUF instruct LLM as a tier: classification by scoring each label's continuation under
//! the prompt (a real distribution over labels, no parsing of free text), and free generation with
//! per-token log-probabilities and energies.

pub mod model;
pub mod template;
pub mod tokenizer;

use candle_core::quantized::gguf_file;
use model::{log_softmax_row, Cache, Logits, QuantLm};
use std::path::{Path, PathBuf};
use tandem_core::Message;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum GgufError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{path}: not a readable GGUF file ({message}); is it truncated? reinstall it with `tandem assets install`")]
    Format { path: PathBuf, message: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("GGUF metadata: {0}")]
    Metadata(String),
    #[error("GGUF tensor: {0}")]
    Tensor(String),
    #[error("{0}")]
    Input(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("model computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// A label's score under the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelScores {
    /// Log-likelihood of each label's continuation: the class logits.
    pub logits: Vec<f32>,
    /// Softmax of the logits.
    pub probs: Vec<f32>,
    pub prompt_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    /// Log-probability of each generated token.
    pub token_logprobs: Vec<f32>,
    /// Energy −logsumexp(logits) of the distribution each token was drawn from (E-LANG).
    pub token_energies: Vec<f32>,
    pub prompt_tokens: usize,
    pub finished: bool,
    /// Stopped by the caller's deadline.
    pub timed_out: bool,
}

pub struct GgufLm {
    pub path: PathBuf,
    pub model: QuantLm,
    pub tokenizer: tokenizer::GgufTokenizer,
    template: template::ChatTemplate,
    pub name: String,
}

impl GgufLm {
    pub fn load(path: &Path) -> Result<Self, GgufError> {
        Self::load_with(path, true)
    }

    /// `dense_prefill`: see [`QuantLm::load`].
    pub fn load_with(path: &Path, dense_prefill: bool) -> Result<Self, GgufError> {
        let mut f = std::fs::File::open(path).map_err(|e| GgufError::Io(path.to_path_buf(), e))?;
        let ct = gguf_file::Content::read(&mut f).map_err(|e| GgufError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let model = QuantLm::load(path, &ct, dense_prefill)?;
        let tokenizer = tokenizer::build(&ct)?;
        let tpl = ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let template = template::ChatTemplate::new(tpl)?;
        let name = ct
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| {
                path.file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        Ok(GgufLm {
            path: path.to_path_buf(),
            model,
            tokenizer,
            template,
            name,
        })
    }

    /// The chat rendered with the model's own template, ready for the assistant's turn.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<String, GgufError> {
        self.template.render(messages, true)
    }

    /// Runs the prompt once; returns its cache and the log-probabilities of the next token.
    pub fn prefill(&self, prompt: &str) -> Result<(Cache, Vec<f32>, usize), GgufError> {
        let ids = self.tokenizer.encode_prompt(prompt)?;
        let (logits, cache) = self.model.forward(&ids, &Cache::default(), Logits::Last)?;
        Ok((cache, log_softmax_row(&logits, 0)?, ids.len()))
    }

    /// Log-likelihood of each continuation after a prefilled prompt; the prompt's cache is reused
    /// for every candidate, so each costs only its own tokens.
    pub fn score_continuations(
        &self,
        cache: &Cache,
        next_logprobs: &[f32],
        candidates: &[Vec<u32>],
    ) -> Result<Vec<f32>, GgufError> {
        let mut out = Vec::with_capacity(candidates.len());
        for cand in candidates {
            let Some((&first, _)) = cand.split_first() else {
                return Err(GgufError::Input(
                    "an empty continuation cannot be scored".into(),
                ));
            };
            let mut lp = next_logprobs
                .get(first as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY);
            if cand.len() > 1 {
                let (logits, _) =
                    self.model
                        .forward(&cand[..cand.len() - 1], cache, Logits::All)?;
                for (row, &tok) in cand[1..].iter().enumerate() {
                    lp += log_softmax_row(&logits, row)?
                        .get(tok as usize)
                        .copied()
                        .unwrap_or(f32::NEG_INFINITY);
                }
            }
            out.push(lp);
        }
        Ok(out)
    }

    /// Classifies: the rendered prompt, then each label's verbaliser as the assistant's answer.
    pub fn classify(
        &self,
        messages: &[Message],
        verbalizers: &[String],
    ) -> Result<LabelScores, GgufError> {
        let prompt = self.chat_prompt(messages)?;
        let (cache, next, prompt_tokens) = self.prefill(&prompt)?;
        let cands: Vec<Vec<u32>> = verbalizers
            .iter()
            .map(|v| self.tokenizer.encode(v))
            .collect::<Result<_, _>>()?;
        let logits = self.score_continuations(&cache, &next, &cands)?;
        let mut probs = logits.clone();
        tandem_core::learner::softmax_in_place(&mut probs);
        Ok(LabelScores {
            logits,
            probs,
            prompt_tokens,
        })
    }

    /// Greedy generation (deterministic) up to `max_tokens` or an end-of-turn token.
    pub fn generate(
        &self,
        messages: &[Message],
        max_tokens: usize,
    ) -> Result<Generation, GgufError> {
        self.generate_until(messages, max_tokens, None)
    }

    /// As [`Self::generate`], stopping early (with `finished` false and `timed_out` true) once
    /// `deadline` passes, so a caller's timeout also frees the CPU.
    pub fn generate_until(
        &self,
        messages: &[Message],
        max_tokens: usize,
        deadline: Option<std::time::Instant>,
    ) -> Result<Generation, GgufError> {
        self.generate_streaming(messages, max_tokens, deadline, &mut |_| true)
    }

    /// As [`Self::generate_until`], handing each new piece of decoded text to `on_text` as soon as
    /// it is whole (never half a UTF-8 character); `on_text` returning false stops generation (the
    /// reader went away).
    pub fn generate_streaming(
        &self,
        messages: &[Message],
        max_tokens: usize,
        deadline: Option<std::time::Instant>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, GgufError> {
        let mut emitted = 0usize;
        let prompt = self.chat_prompt(messages)?;
        let ids = self.tokenizer.encode_prompt(&prompt)?;
        let (mut logits, mut cache) = self.model.forward(&ids, &Cache::default(), Logits::Last)?;
        let mut g = Generation {
            text: String::new(),
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            token_energies: Vec::new(),
            prompt_tokens: ids.len(),
            finished: false,
            timed_out: false,
        };
        for _ in 0..max_tokens {
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                g.timed_out = true;
                break;
            }
            let row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
            let (tok, best) =
                row.iter()
                    .enumerate()
                    .fold((0usize, f32::NEG_INFINITY), |acc, (i, &v)| {
                        if v > acc.1 {
                            (i, v)
                        } else {
                            acc
                        }
                    });
            let tok = tok as u32;
            if self.tokenizer.eos.contains(&tok) {
                g.finished = true;
                break;
            }
            g.tokens.push(tok);
            g.token_logprobs.push(best - lse);
            g.token_energies.push(-lse);
            let text = self.tokenizer.decode(&g.tokens)?;
            if text.len() > emitted && !text.ends_with('\u{FFFD}') && text.is_char_boundary(emitted)
            {
                if !on_text(&text[emitted..]) {
                    break;
                }
                emitted = text.len();
            }
            let (l, c) = self.model.forward(&[tok], &cache, Logits::Last)?;
            logits = l;
            cache = c;
        }
        g.text = self.tokenizer.decode(&g.tokens)?;
        if g.text.len() > emitted && g.text.is_char_boundary(emitted) {
            on_text(&g.text[emitted..]);
        }
        Ok(g)
    }
}
