//! The tokenizer of a GGUF model, built from its own metadata (vocabulary, merges, token types and
//! pre-tokenizer name), so no tokenizer file from a hub is needed.

use super::model::md_u32;
use super::GgufError;
use candle_core::quantized::gguf_file::{self, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's split pattern (as llama.cpp's "qwen2" pre-tokenizer).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn strings(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>, GgufError> {
    match ct.metadata.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| GgufError::Metadata(format!("`{key}`: {e}")))
            })
            .collect(),
        Some(_) => Err(GgufError::Metadata(format!(
            "`{key}` is not an array of strings"
        ))),
        None => Err(GgufError::Metadata(format!("missing key `{key}`"))),
    }
}

pub struct GgufTokenizer {
    pub inner: Tokenizer,
    pub eos: Vec<u32>,
    pub bos: Option<u32>,
    pub add_bos: bool,
}

pub fn build(ct: &gguf_file::Content) -> Result<GgufTokenizer, GgufError> {
    let model = ct
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(GgufError::Unsupported(format!(
            "tokenizer model {model:?} is not supported (supported: gpt2-style byte-level BPE)"
        )));
    }
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let tokens = strings(ct, "tokenizer.ggml.tokens")?;
    let merges = strings(ct, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(v)) => v.iter().map(|x| x.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| {
            GgufError::Metadata(format!("cannot build BPE from the GGUF vocabulary: {e}"))
        })?;
    let mut tk = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, false);
    let pre_tok: PreTokenizerWrapper = match pre.as_str() {
        "qwen2" => {
            let split = Split::new(
                SplitPattern::Regex(QWEN2_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| GgufError::Metadata(format!("qwen2 split pattern: {e}")))?;
            Sequence::new(vec![split.into(), byte_level.into()]).into()
        }
        "smollm" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        _ => ByteLevel::new(false, true, true).into(),
    };
    tk.with_pre_tokenizer(Some(pre_tok));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    tk.add_special_tokens(&special);
    let eos = md_u32(ct, "tokenizer.ggml.eos_token_id")
        .ok()
        .map(|e| e as u32);
    let mut eos: Vec<u32> = eos.into_iter().collect();
    // Chat models end a turn with their end-of-turn token, which is not always the EOS id.
    for end in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
        if let Some(id) = tokens.iter().position(|t| t == end) {
            if !eos.contains(&(id as u32)) {
                eos.push(id as u32);
            }
        }
    }
    let bos = md_u32(ct, "tokenizer.ggml.bos_token_id")
        .ok()
        .map(|b| b as u32);
    let add_bos = ct
        .metadata
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    Ok(GgufTokenizer {
        inner: tk,
        eos,
        bos,
        add_bos,
    })
}

impl GgufTokenizer {
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, GgufError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| GgufError::Input(format!("cannot tokenize: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The prompt's tokens, with BOS first when the model asks for it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, GgufError> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, GgufError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| GgufError::Input(format!("cannot decode: {e}")))
    }
}
