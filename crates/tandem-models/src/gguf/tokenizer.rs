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

use std::collections::HashMap;

/// GGUF's token type for a byte-fallback token such as `<0x0A>`.
const TOKEN_TYPE_BYTE: i32 = 6;

/// Whether GPT-2's byte-level alphabet writes byte `b` as the character of the same code point.
const fn is_printable_byte(b: u32) -> bool {
    (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255)
}

/// The 68 bytes GPT-2's alphabet moves to U+0100.. (in byte order: U+0100 is byte 0).
const SHIFTED_BYTES: [u8; 68] = {
    let mut out = [0u8; 68];
    let (mut n, mut b) = (0usize, 0u32);
    while b < 256 {
        if !is_printable_byte(b) {
            out[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    out
};

/// The byte a character of GPT-2's byte-level alphabet stands for (`Ġ` → b' ', `Ċ` → b'\n').
fn byte_of_char(c: char) -> Option<u8> {
    let c = c as u32;
    if is_printable_byte(c) {
        return Some(c as u8);
    }
    SHIFTED_BYTES
        .get(usize::try_from(c.checked_sub(256)?).ok()?)
        .copied()
}

/// A vocabulary entry's bytes as the byte-level decoder gives them: each character mapped back to
/// its byte, or (as `tokenizers` does) the entry's own UTF-8 when any character is outside the
/// alphabet, as in added tokens like `<|im_end|>`.
fn byte_level_bytes(piece: &str) -> Vec<u8> {
    piece
        .chars()
        .map(byte_of_char)
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| piece.as_bytes().to_vec())
}

/// The byte of a byte-fallback entry `<0xNN>`.
fn fallback_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

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
    /// Byte-fallback tokens (GGUF type BYTE, `<0xNN>`) and the byte each stands for; empty for
    /// the usual byte-level vocabularies, whose 256 base tokens already cover every byte.
    byte_fallback: HashMap<u32, u8>,
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
    let byte_fallback: HashMap<u32, u8> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &t))| t == TOKEN_TYPE_BYTE)
        .filter_map(|(i, (s, _))| Some((i as u32, fallback_byte(s)?)))
        .collect();
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
        byte_fallback,
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

    /// The text of `ids`, special tokens skipped: the lossy UTF-8 of their concatenated
    /// [`Self::text_bytes`] (what `tokenizers`' byte-level decoder gives, plus byte-fallback
    /// tokens as their bytes), so per-token bytes always add up to the text.
    pub fn decode(&self, ids: &[u32]) -> Result<String, GgufError> {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend(self.text_bytes(id));
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Token `id`'s raw bytes: byte-level characters mapped back to bytes (`Ġ` → b" "),
    /// byte-fallback tokens to their byte (`<0x0A>` → b"\n"), special tokens to their literal
    /// text (`<|im_end|>`); `None` for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        if let Some(&b) = self.byte_fallback.get(&id) {
            return Some(vec![b]);
        }
        self.inner.id_to_token(id).map(|t| byte_level_bytes(&t))
    }

    /// Whether `id` is a special (control) token, which decoded text leaves out.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .id_to_token(id)
            .is_some_and(|t| self.inner.get_added_vocabulary().is_special_token(&t))
    }

    /// The bytes token `id` adds to decoded text: its [`Self::token_bytes`], or nothing for a
    /// special token or an id outside the vocabulary.
    pub fn text_bytes(&self, id: u32) -> Vec<u8> {
        if let Some(&b) = self.byte_fallback.get(&id) {
            return vec![b];
        }
        match self.inner.id_to_token(id) {
            Some(t) if !self.inner.get_added_vocabulary().is_special_token(&t) => {
                byte_level_bytes(&t)
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{Content, VersionedMagic};

    /// GPT-2's `bytes_to_unicode`, written as in its encoder.py: the character for each byte.
    fn gpt2_alphabet() -> Vec<char> {
        let mut bs: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        let mut out = vec!['\0'; 256];
        for (b, c) in bs.into_iter().zip(cs) {
            out[b as usize] = char::from_u32(c).unwrap();
        }
        out
    }

    /// A tiny byte-level vocabulary: the 256 bytes, a few merges, a byte-fallback token and two
    /// control tokens.
    fn tiny() -> (GgufTokenizer, Vec<String>) {
        let mut tokens: Vec<String> = gpt2_alphabet().iter().map(|c| c.to_string()).collect();
        let mut types = vec![1i32; 256];
        for (t, ty) in [
            ("Ġt", 1),
            ("he", 1),
            ("Ġthe", 1),
            ("Ã©", 1),
            ("<0x0A>", TOKEN_TYPE_BYTE),
            ("<|im_end|>", 3),
            ("<|im_start|>", 3),
        ] {
            tokens.push(t.into());
            types.push(ty);
        }
        let merges = ["Ġ t", "h e", "Ġt he", "Ã ©"];
        let strs = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
        let metadata = [
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strs(tokens.clone())),
            (
                "tokenizer.ggml.merges",
                strs(merges.iter().map(|m| m.to_string()).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let ct = Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        };
        (build(&ct).unwrap(), tokens)
    }

    #[test]
    fn every_byte_level_character_maps_to_its_byte() {
        let (tk, _) = tiny();
        for b in 0..=255u8 {
            assert_eq!(tk.token_bytes(u32::from(b)), Some(vec![b]), "byte {b}");
        }
        assert_eq!(byte_of_char('Ġ'), Some(b' '));
        assert_eq!(byte_of_char('Ċ'), Some(b'\n'));
        assert_eq!(byte_of_char('\u{0144}'), None);
    }

    #[test]
    fn token_bytes_cover_merges_fallback_and_special_tokens() {
        let (tk, tokens) = tiny();
        let id = |t: &str| tokens.iter().position(|x| x == t).unwrap() as u32;
        assert_eq!(tk.token_bytes(id("Ġthe")), Some(b" the".to_vec()));
        assert_eq!(tk.token_bytes(id("Ã©")), Some("é".as_bytes().to_vec()));
        assert_eq!(tk.token_bytes(id("<0x0A>")), Some(vec![b'\n']));
        assert_eq!(tk.text_bytes(id("<0x0A>")), vec![b'\n']);
        assert_eq!(
            tk.token_bytes(id("<|im_end|>")),
            Some(b"<|im_end|>".to_vec())
        );
        assert!(tk.is_special(id("<|im_end|>")));
        assert!(!tk.is_special(id("Ġthe")));
        assert!(tk.text_bytes(id("<|im_end|>")).is_empty());
        assert_eq!(tk.token_bytes(tokens.len() as u32), None);
        assert!(tk.text_bytes(tokens.len() as u32).is_empty());
        assert_eq!(fallback_byte("<0xff>"), Some(0xFF));
        assert_eq!(fallback_byte("<0x0A0>"), None);
    }

    #[test]
    fn token_bytes_add_up_to_the_decoded_text() {
        let (tk, tokens) = tiny();
        let text = "the thé\n café the\u{1F600}!";
        let mut ids = tk.encode(text).unwrap();
        assert!(ids.contains(&(tokens.iter().position(|t| t == "Ġthe").unwrap() as u32)));
        // A control token in the middle: decoding skips it, and so do its text bytes.
        ids.insert(
            2,
            tokens.iter().position(|t| t == "<|im_end|>").unwrap() as u32,
        );
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| tk.text_bytes(i)).collect();
        assert_eq!(bytes, text.as_bytes());
        assert_eq!(tk.decode(&ids).unwrap(), text);
        // The same text as `tokenizers`' own decoder (no byte-fallback tokens involved).
        assert_eq!(
            tk.decode(&ids).unwrap(),
            tk.inner.decode(&ids, true).unwrap()
        );
        // Half a character decodes lossily, as before.
        let emoji = tk.encode("\u{1F600}").unwrap();
        assert_eq!(emoji.len(), 4);
        assert_eq!(
            tk.decode(&emoji[..2]).unwrap(),
            tk.inner.decode(&emoji[..2], true).unwrap()
        );
    }
}
