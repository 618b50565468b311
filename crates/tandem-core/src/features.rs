//! Hashed sparse features: word and character n-grams of text, tokens and numeric values, each in
//! its own namespace, hashed into a fixed 2^bits space. Buffers are reused, so featurizing a query
//! allocates nothing once they have grown to the size of the longest input seen.

use crate::error::CoreError;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Feature {
    pub index: u32,
    pub value: f32,
}

/// A reusable sparse vector.
#[derive(Debug, Clone, Default)]
pub struct FeatureVec {
    items: Vec<Feature>,
}

impl FeatureVec {
    pub fn clear(&mut self) {
        self.items.clear();
    }

    pub fn push(&mut self, index: u32, value: f32) {
        self.items.push(Feature { index, value });
    }

    pub fn as_slice(&self) -> &[Feature] {
        &self.items
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn extend_from(&mut self, other: &FeatureVec) {
        self.items.extend_from_slice(&other.items);
    }
}

/// Which n-grams a text contributes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextFeatures {
    /// Word n-grams up to this order (1 = unigrams, 2 = unigrams and bigrams, 0 = none).
    pub word_ngrams: u8,
    /// Character n-grams from `char_min` to `char_max` (0 = none), over lower-cased text with runs
    /// of spaces and punctuation folded to one space.
    pub char_min: u8,
    pub char_max: u8,
}

impl Default for TextFeatures {
    fn default() -> Self {
        TextFeatures {
            word_ngrams: 2,
            char_min: 3,
            char_max: 5,
        }
    }
}

/// Namespaces keep a word of the prompt and the same word of a response apart.
pub mod ns {
    pub const BIAS: u64 = 0x6269_6173;
    pub const PROMPT: u64 = 0x7072_6f6d;
    pub const RESPONSE: u64 = 0x7265_7370;
    pub const META: u64 = 0x6d65_7461;
    pub const NUMERIC: u64 = 0x6e75_6d65;
    pub const EMBEDDING: u64 = 0x656d_6265;
    /// The weak answer's sentence vector (the cascade scorer's), apart from the prompt's.
    pub const RESPONSE_EMBEDDING: u64 = 0x7265_6d62;
}

const CHAR_NS: u64 = 0x9e37_79b9_7f4a_7c15;
const BIGRAM_NS: u64 = 0xc2b2_ae3d_27d4_eb4f;

#[derive(Debug, Clone)]
pub struct Featurizer {
    bits: u32,
    mask: u64,
    folded: Vec<u8>,
    words: Vec<u64>,
    start: usize,
}

impl Featurizer {
    /// `bits` between 10 and 28: 2^bits weights per class in a learner.
    pub fn new(bits: u32) -> Result<Self, CoreError> {
        if !(10..=28).contains(&bits) {
            return Err(CoreError::config(
                "hash_bits",
                bits,
                "must be between 10 and 28",
            ));
        }
        Ok(Featurizer {
            bits,
            mask: (1u64 << bits) - 1,
            folded: Vec::new(),
            words: Vec::new(),
            start: 0,
        })
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }

    fn index(&self, h: u64) -> u32 {
        (h & self.mask) as u32
    }

    /// Feature indices for the `n` components of a dense vector (a sentence embedding).
    pub fn dense_indices(&self, namespace: u64, n: usize) -> Vec<u32> {
        (0..n as u64)
            .map(|i| self.index(mix(namespace.rotate_left(32) ^ i)))
            .collect()
    }

    pub fn add_bias(&self, out: &mut FeatureVec) {
        out.push(self.index(xxh3_64_with_seed(b"bias", ns::BIAS)), 1.0);
    }

    /// A categorical feature, e.g. metadata `subject=anatomy`.
    pub fn add_token(&self, namespace: u64, token: &str, value: f32, out: &mut FeatureVec) {
        out.push(
            self.index(xxh3_64_with_seed(token.as_bytes(), namespace)),
            value,
        );
    }

    /// A real-valued feature under a name; callers keep values in a small range (about [-3, 3]).
    pub fn add_numeric(&self, name: &str, value: f32, out: &mut FeatureVec) {
        if value.is_finite() {
            out.push(
                self.index(xxh3_64_with_seed(name.as_bytes(), ns::NUMERIC)),
                value,
            );
        }
    }

    /// Adds the n-grams of `text`; their values are scaled so that together they have L2 norm
    /// `weight`, whatever the length of the text.
    pub fn add_text(
        &mut self,
        namespace: u64,
        text: &str,
        cfg: TextFeatures,
        weight: f32,
        out: &mut FeatureVec,
    ) {
        self.fold(text);
        self.start = out.len();
        self.add_words(namespace, cfg.word_ngrams, out);
        if cfg.char_min > 0 && cfg.char_max >= cfg.char_min {
            self.add_chars(namespace, cfg.char_min as usize, cfg.char_max as usize, out);
        }
        let n = out.len() - self.start;
        if n > 0 {
            let v = weight / (n as f32).sqrt();
            for f in &mut out.items[self.start..] {
                f.value = v;
            }
        }
    }

    /// Lower-cases ASCII and folds every run of ASCII non-alphanumerics to one space; other bytes
    /// (UTF-8 of non-ASCII letters) are kept as they are, so words in any script stay whole.
    fn fold(&mut self, text: &str) {
        self.folded.clear();
        self.folded.push(b' ');
        for &b in text.as_bytes() {
            if b.is_ascii_alphanumeric() || b >= 0x80 {
                self.folded.push(b.to_ascii_lowercase());
            } else if self.folded.last() != Some(&b' ') {
                self.folded.push(b' ');
            }
        }
        if self.folded.last() != Some(&b' ') {
            self.folded.push(b' ');
        }
    }

    fn add_words(&mut self, namespace: u64, order: u8, out: &mut FeatureVec) {
        if order == 0 {
            return;
        }
        self.words.clear();
        for w in self.folded.split(|&b| b == b' ').filter(|w| !w.is_empty()) {
            self.words.push(xxh3_64_with_seed(w, namespace));
        }
        for (i, &h) in self.words.iter().enumerate() {
            out.push(self.index(h), 1.0);
            if order >= 2 && i > 0 {
                let pair = self.words[i - 1].rotate_left(17) ^ h;
                out.push(self.index(mix(pair ^ BIGRAM_NS)), 1.0);
            }
        }
    }

    fn add_chars(&self, namespace: u64, min: usize, max: usize, out: &mut FeatureVec) {
        let seed = namespace ^ CHAR_NS;
        let b = &self.folded;
        for n in min..=max {
            if b.len() < n {
                break;
            }
            for gram in b.windows(n) {
                out.push(
                    self.index(xxh3_64_with_seed(gram, seed.wrapping_add(n as u64))),
                    1.0,
                );
            }
        }
    }
}

/// A 64-bit finaliser (splitmix64) to spread combined word hashes.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Buffers for scoring with a model shared read-only between threads: each caller brings its own
/// featurizer (whose text buffers are mutable) and feature vectors.
#[derive(Debug, Clone)]
pub struct Scratch {
    pub featurizer: Featurizer,
    pub a: FeatureVec,
    pub b: FeatureVec,
}

impl Scratch {
    pub fn new(bits: u32) -> Result<Self, CoreError> {
        Ok(Scratch {
            featurizer: Featurizer::new(bits)?,
            a: FeatureVec::default(),
            b: FeatureVec::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_features_are_normalised_and_deterministic() {
        let mut f = Featurizer::new(18).unwrap();
        let mut a = FeatureVec::default();
        f.add_text(
            ns::PROMPT,
            "Hello, World!  hello",
            TextFeatures::default(),
            1.0,
            &mut a,
        );
        let norm: f32 = a.as_slice().iter().map(|x| x.value * x.value).sum();
        assert!((norm - 1.0).abs() < 1e-5);
        let mut b = FeatureVec::default();
        f.add_text(
            ns::PROMPT,
            "hello world hello",
            TextFeatures::default(),
            1.0,
            &mut b,
        );
        // Case and punctuation are folded away: the same features.
        assert_eq!(a.as_slice(), b.as_slice());
        let mut c = FeatureVec::default();
        f.add_text(
            ns::RESPONSE,
            "hello world hello",
            TextFeatures::default(),
            1.0,
            &mut c,
        );
        assert_ne!(
            a.as_slice()[0].index,
            c.as_slice()[0].index,
            "namespaces differ"
        );
    }

    #[test]
    fn counts_of_ngrams() {
        let mut f = Featurizer::new(20).unwrap();
        let mut v = FeatureVec::default();
        let cfg = TextFeatures {
            word_ngrams: 2,
            char_min: 0,
            char_max: 0,
        };
        f.add_text(ns::PROMPT, "a b c", cfg, 1.0, &mut v);
        assert_eq!(v.len(), 3 + 2);
        v.clear();
        let cfg = TextFeatures {
            word_ngrams: 0,
            char_min: 3,
            char_max: 3,
        };
        f.add_text(ns::PROMPT, "ab", cfg, 1.0, &mut v);
        assert_eq!(v.len(), 2, "' ab' and 'ab '");
        v.clear();
        f.add_text(ns::PROMPT, "", cfg, 1.0, &mut v);
        assert!(v.is_empty());
    }

    #[test]
    fn non_ascii_text_is_fine() {
        let mut f = Featurizer::new(16).unwrap();
        let mut v = FeatureVec::default();
        f.add_text(
            ns::PROMPT,
            "Übergrößenträger — 東京",
            TextFeatures::default(),
            1.0,
            &mut v,
        );
        assert!(!v.is_empty());
        assert!(Featurizer::new(40).is_err());
    }
}
