use crate::money::Micros;
use crate::tier::TierId;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Tokens a call consumed, when known (estimated for replayed answers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// What a tier produced. Classifiers expose their class distribution and logits, generators their
/// text with per-token log-probabilities when the backend gives them: the policies read these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Output {
    Label {
        class: usize,
        probs: Vec<f32>,
        #[serde(default)]
        logits: Option<Vec<f32>>,
    },
    Text {
        text: String,
        #[serde(default)]
        token_logprobs: Option<Vec<f32>>,
    },
}

/// One tier's answer to one query, with what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub tier: TierId,
    pub output: Output,
    pub usage: Usage,
    pub cost: Micros,
    #[serde(with = "duration_us")]
    pub compute: Duration,
}

impl Answer {
    pub fn text(&self) -> Option<&str> {
        match &self.output {
            Output::Text { text, .. } => Some(text),
            Output::Label { .. } => None,
        }
    }
}

mod duration_us {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_micros() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_micros(u64::deserialize(d)?))
    }
}
