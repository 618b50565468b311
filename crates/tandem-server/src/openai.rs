//! OpenAI's chat-completions wire shapes, as far as the gateway reads and writes them. Fields the
//! gateway does not interpret (tools, response_format, ...) are kept and forwarded upstream, so a
//! client loses nothing by going through tandem.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tandem_core::Message;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatMessage {
    pub role: String,
    /// A string, an array of content parts, or null (assistant turns with tool calls).
    #[serde(default)]
    pub content: Value,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    /// The message's text: the string, or the text parts joined.
    pub fn text(&self) -> String {
        match &self.content {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Per-request overrides, in the extension field `tandem` (or the matching headers).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// `small` or `large`: skip the decision (still budgeted).
    pub force: Option<Force>,
    /// Do not learn from this request.
    #[serde(default)]
    pub no_learn: bool,
    /// `switching` routes: the episode (agent run) this request is a step of; also the header
    /// `x-tandem-episode`.
    pub episode: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Force {
    Small,
    Large,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tandem: Option<Overrides>,
    /// Everything else (temperature, tools, ...), forwarded as is.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatRequest {
    pub fn core_messages(&self) -> Vec<Message> {
        self.messages
            .iter()
            .map(|m| Message {
                role: m.role.clone(),
                content: m.text(),
            })
            .collect()
    }

    pub fn token_cap(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct WireUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// What tandem did, in the response body as an extension (clients ignore unknown fields).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TandemInfo {
    pub route: String,
    /// The upstream that produced the answer.
    pub tier: String,
    /// `small` or `large`.
    pub role: String,
    pub escalated: bool,
    pub score: Option<f32>,
    pub cost_usd: f64,
    /// The large model was wanted but its budget refused it.
    pub capped: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: WireUsage,
    pub tandem: TandemInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Choice {
    pub index: u32,
    pub message: OutMessage,
    pub finish_reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutMessage {
    pub role: String,
    pub content: String,
}

/// Feedback on a response, as `POST /v1/feedback` takes it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Feedback {
    /// The response graded (feedback on one answer)...
    pub response_id: Option<String>,
    /// ...or, on `switching` routes, the episode rewarded: `reward` is added to its latest step.
    pub episode_id: Option<String>,
    pub reward: Option<f64>,
    /// The episode is over: the controller learns from it and forgets it.
    #[serde(default)]
    pub done: bool,
    /// A quality score in [0, 1].
    pub score: Option<f64>,
    /// Or a flag: correct or not.
    pub correct: Option<bool>,
    /// A reference answer: the served answer is scored by its agreement with it.
    pub reference: Option<String>,
}
