//! A local GGUF instruct LLM as a tier: classification by scoring each label's continuation under
//! the prompt (a real distribution over labels, no parsing of free text), and free generation with
//! per-token log-probabilities and energies.

pub mod model;
pub mod template;
pub mod tokenizer;

use candle_core::quantized::gguf_file;
use model::{log_softmax_row, Cache, Logits, QuantLm};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tandem_core::Message;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum GgufError {
    // The cause is in the message and not chained as a source: a chain printer (anyhow's
    // `{:#}`) would repeat it.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
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
    Candle(candle_core::Error),
}

// By hand rather than `#[from]`, which would also chain the error as a source (see `Io`).
impl From<candle_core::Error> for GgufError {
    fn from(e: candle_core::Error) -> Self {
        GgufError::Candle(e)
    }
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
    /// Per generated token, its text, bytes, log-probability and the most likely alternatives,
    /// as OpenAI's `logprobs.content`; filled only when [`GenOptions::logprobs`] asks for it
    /// (else empty), one entry per element of `tokens`.
    pub token_details: Vec<TokenLogprob>,
    pub prompt_tokens: usize,
    pub finished: bool,
    /// Stopped by the caller's deadline.
    pub timed_out: bool,
}

/// One generated token as OpenAI's `logprobs.content[i]` describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token's text: lossy UTF-8 of `bytes` (a token may hold part of a character).
    pub token: String,
    /// The bytes the token adds to the generated text; concatenated over a generation they are
    /// the text's UTF-8 (whenever the text is valid UTF-8, i.e. does not end mid-character).
    /// Empty for a special token, which the text leaves out.
    pub bytes: Vec<u8>,
    /// Natural log-probability of the chosen token (≤ 0).
    pub logprob: f32,
    /// The [`GenOptions::top_logprobs`] most likely tokens at this step, most likely first;
    /// under greedy decoding the first is the chosen token.
    pub top: Vec<TopLogprob>,
}

/// An alternative token at one generation step.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    /// Lossy UTF-8 of `bytes`.
    pub token: String,
    /// The token's raw bytes (a special token's literal text, such as `<|im_end|>`).
    pub bytes: Vec<u8>,
    /// Natural log-probability of this token at this step (≤ 0).
    pub logprob: f32,
}

/// Options of [`GgufLm::generate_with`].
#[derive(Debug, Clone, Default)]
pub struct GenOptions {
    /// Most tokens to generate (the end-of-turn token not counted).
    pub max_tokens: usize,
    /// Alternatives to record per token, 0..=[`MAX_TOP_LOGPROBS`]; only used with `logprobs`.
    pub top_logprobs: usize,
    /// Record a [`TokenLogprob`] per generated token in [`Generation::token_details`].
    pub logprobs: bool,
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
        deadline: Option<Instant>,
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
        deadline: Option<Instant>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, GgufError> {
        let opts = GenOptions {
            max_tokens,
            ..GenOptions::default()
        };
        // Without logprobs every piece has text; the guard only keeps that promise explicit.
        self.generate_with(messages, &opts, deadline, &mut |text, _| {
            text.is_empty() || on_text(text)
        })
    }

    /// Greedy generation (deterministic) up to `opts.max_tokens` tokens or an end-of-turn token,
    /// stopping early (with `timed_out` true) once `deadline` passes.
    ///
    /// `on_piece(text, tokens)` gets each new piece of decoded text as soon as it is whole (never
    /// half a UTF-8 character) with the [`TokenLogprob`] entries of the tokens decoded since the
    /// previous piece (an empty slice when `opts.logprobs` is false); over a whole generation the
    /// slices add up to [`Generation::token_details`]. A last piece may have empty text when only
    /// special tokens remain. `on_piece` returning false stops generation (the reader went away);
    /// nothing more is handed to it then.
    ///
    /// Errors with [`GgufError::Input`] when `opts.top_logprobs` exceeds [`MAX_TOP_LOGPROBS`].
    pub fn generate_with(
        &self,
        messages: &[Message],
        opts: &GenOptions,
        deadline: Option<Instant>,
        on_piece: &mut dyn FnMut(&str, &[TokenLogprob]) -> bool,
    ) -> Result<Generation, GgufError> {
        if opts.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(GgufError::Input(format!(
                "top_logprobs is {}; at most {MAX_TOP_LOGPROBS} are supported",
                opts.top_logprobs
            )));
        }
        let top_k = if opts.logprobs { opts.top_logprobs } else { 0 };
        let prompt = self.chat_prompt(messages)?;
        let ids = self.tokenizer.encode_prompt(&prompt)?;
        let (mut logits, mut cache) = self.model.forward(&ids, &Cache::default(), Logits::Last)?;
        let mut g = Generation {
            text: String::new(),
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            token_energies: Vec::new(),
            token_details: Vec::new(),
            prompt_tokens: ids.len(),
            finished: false,
            timed_out: false,
        };
        // The decoded text's bytes, grown a token at a time (decoding is per-token bytes).
        let mut bytes: Vec<u8> = Vec::new();
        // Bytes of text and entries of `token_details` already handed to `on_piece`.
        let (mut emitted, mut handed) = (0usize, 0usize);
        let mut stopped = false;
        let mut top: Vec<(f32, u32)> = Vec::with_capacity(top_k + 1);
        for _ in 0..opts.max_tokens {
            if deadline.is_some_and(|d| Instant::now() >= d) {
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
            let piece = self.tokenizer.text_bytes(tok);
            g.tokens.push(tok);
            g.token_logprobs.push(best - lse);
            g.token_energies.push(-lse);
            if opts.logprobs {
                top_k_into(&row, top_k, &mut top);
                g.token_details.push(TokenLogprob {
                    token: String::from_utf8_lossy(&piece).into_owned(),
                    bytes: piece.clone(),
                    logprob: best - lse,
                    top: top
                        .iter()
                        .map(|&(v, id)| {
                            let b = self.tokenizer.token_bytes(id).unwrap_or_default();
                            TopLogprob {
                                token: String::from_utf8_lossy(&b).into_owned(),
                                bytes: b,
                                logprob: v - lse,
                            }
                        })
                        .collect(),
                });
            }
            bytes.extend_from_slice(&piece);
            let text = String::from_utf8_lossy(&bytes);
            if text.len() > emitted && !text.ends_with('\u{FFFD}') && text.is_char_boundary(emitted)
            {
                if !on_piece(&text[emitted..], &g.token_details[handed..]) {
                    stopped = true;
                    break;
                }
                emitted = text.len();
                handed = g.token_details.len();
            }
            let (l, c) = self.model.forward(&[tok], &cache, Logits::Last)?;
            logits = l;
            cache = c;
        }
        g.text = String::from_utf8_lossy(&bytes).into_owned();
        let rest = g.text.get(emitted..).unwrap_or_default();
        if !stopped && (!rest.is_empty() || handed < g.token_details.len()) {
            on_piece(rest, &g.token_details[handed..]);
        }
        Ok(g)
    }
}

/// The most `top_logprobs` a request may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Writes the `k` largest logits of `row` into `top` as (logit, token id), largest first, ties by
/// lower id first (as the greedy pick). One pass keeping a sorted list of `k` ≤ 20: after the
/// first few tokens almost every logit fails the single comparison with the k-th, so it costs
/// about one comparison per vocabulary entry — no sort, no allocation beyond `top`.
fn top_k_into(row: &[f32], k: usize, top: &mut Vec<(f32, u32)>) {
    top.clear();
    if k == 0 {
        return;
    }
    for (i, &v) in row.iter().enumerate() {
        // Full: only a logit above the k-th enters (NaN compares false, so never does).
        let enters = match top.last() {
            Some(&(w, _)) if top.len() == k => v > w,
            _ => !v.is_nan(),
        };
        if !enters {
            continue;
        }
        let at = top.partition_point(|&(w, _)| w >= v);
        top.insert(at, (v, i as u32));
        top.truncate(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message as anyhow's `{:#}` prints it: the error and each source after it.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut next = e.source();
        while let Some(c) = next {
            s = format!("{s}: {c}");
            next = c.source();
        }
        s
    }

    fn os_errors() -> Vec<std::io::Error> {
        vec![
            std::io::Error::from_raw_os_error(2),
            std::io::Error::from_raw_os_error(13),
            std::io::Error::from_raw_os_error(21),
            std::io::Error::other("disk on fire"),
        ]
    }

    /// An I/O error's cause shows once, with the path, however the error is printed.
    #[test]
    fn io_cause_is_printed_once() {
        for error in os_errors() {
            let cause = error.to_string();
            let text = chain(&GgufError::Io(PathBuf::from("a/b"), error));
            assert_eq!(text.matches(&cause).count(), 1, "{text}");
            assert!(text.starts_with("a/b: "), "{text}");
        }
    }

    #[test]
    fn top_k_matches_a_full_sort() {
        let row: Vec<f32> = (0..1000u32)
            .map(|i| ((i * 7919) % 1009) as f32 * 0.01 - 5.0)
            .chain([f32::NAN, 9.0, 9.0, f32::NEG_INFINITY])
            .collect();
        let mut want: Vec<(f32, u32)> = row
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_nan())
            .map(|(i, &v)| (v, i as u32))
            .collect();
        want.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut top = Vec::new();
        for k in [0, 1, 2, 5, 20] {
            top_k_into(&row, k, &mut top);
            assert_eq!(top, want[..k], "k = {k}");
        }
        // Fewer entries than k: all of them.
        top_k_into(&[1.0, 3.0, 2.0], 5, &mut top);
        assert_eq!(top, [(3.0, 1), (2.0, 2), (1.0, 0)]);
    }
}
