//! OpenAI's chat-completions wire shapes, as far as the gateway reads them. The gateway forwards
//! the client's body as it came (less tandem's own `tandem` field, with `model` replaced) and the
//! upstream's answer as it came (with tandem's id, the route as `model`, and a `tandem` field
//! added): these types are views for deciding and accounting, never the shape that is sent on.

use crate::error::GatewayError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
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
    /// The message's text: the string, or the text parts joined; an assistant turn's tool calls
    /// as `name(arguments)` lines, so routers and scorers see them.
    pub fn text(&self) -> String {
        let mut out = match &self.content {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        };
        if let Some(calls) = self.extra.get("tool_calls").and_then(Value::as_array) {
            for c in calls {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(&call_text(c));
            }
        }
        out
    }
}

/// A tool call (`{"function": {"name", "arguments"}}`) as one line of text: `name(arguments)`.
pub fn call_text(c: &Value) -> String {
    let f = &c["function"];
    format!(
        "{}({})",
        f["name"].as_str().unwrap_or(""),
        f["arguments"].as_str().unwrap_or("")
    )
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

/// The fields of a request the gateway reads; everything else is only forwarded.
#[derive(Deserialize)]
struct Known {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<Value>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<u32>,
    #[serde(default)]
    tandem: Option<Overrides>,
}

/// A chat request: the client's body, kept whole for forwarding, and what the gateway reads of it.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The client's JSON object less `tandem`: what every upstream receives (with its `model`).
    pub body: Arc<Map<String, Value>>,
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub stream: bool,
    /// `stream_options.include_usage`: the client wants the usage chunk.
    pub include_usage: bool,
    /// Choices asked for (`n`, default 1).
    pub n: u32,
    /// What the client asked of log-probabilities: None (nothing), or Some(k) top alternatives
    /// per token (0 with `logprobs: true` alone).
    pub logprobs: Option<u32>,
    pub tandem: Option<Overrides>,
}

impl ChatRequest {
    /// Parses a request body. Errors name the field at fault.
    pub fn parse(bytes: &[u8]) -> Result<ChatRequest, GatewayError> {
        // One parse of the bytes; the fields tandem reads are taken from the parsed tree.
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| GatewayError::BadJson(e.to_string()))?;
        // Not an object: said plainly, before serde would name its own internal type.
        if !v.is_object() {
            return Err(GatewayError::BadJson(
                "the body must be a JSON object".into(),
            ));
        }
        let k = Known::deserialize(&v).map_err(|e| GatewayError::BadJson(e.to_string()))?;
        let Value::Object(mut body) = v else {
            return Err(GatewayError::BadJson(
                "the body must be a JSON object".into(),
            ));
        };
        body.remove("tandem");
        let include_usage = k
            .stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if k.n == Some(0) {
            return Err(GatewayError::BadRequest("`n` must be at least 1".into()));
        }
        if let Some(t) = k.top_logprobs {
            if t > 20 {
                return Err(GatewayError::BadRequest(format!(
                    "`top_logprobs` must be between 0 and 20, got {t}"
                )));
            }
        }
        let logprobs = match (k.logprobs, k.top_logprobs) {
            (Some(true), t) => Some(t.unwrap_or(0)),
            _ => None,
        };
        Ok(ChatRequest {
            body: Arc::new(body),
            model: k.model,
            messages: k.messages,
            stream: k.stream.unwrap_or(false),
            include_usage,
            n: k.n.unwrap_or(1),
            logprobs,
            tandem: k.tandem,
        })
    }

    pub fn core_messages(&self) -> Vec<Message> {
        self.messages
            .iter()
            .map(|m| Message {
                role: m.role.clone(),
                content: m.text(),
            })
            .collect()
    }

    /// The tools the request offers, by name, with their parameter schemas.
    pub fn tools(&self) -> BTreeMap<String, Value> {
        self.body
            .get("tools")
            .and_then(Value::as_array)
            .map(|ts| {
                ts.iter()
                    .filter_map(|t| {
                        let f = &t["function"];
                        let name = f["name"].as_str()?;
                        Some((name.to_string(), f["parameters"].clone()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `tool_choice` as one word: `auto`, `none`, `required`, or `function:NAME`.
    pub fn tool_choice(&self) -> Option<String> {
        match self.body.get("tool_choice")? {
            Value::String(s) => Some(s.clone()),
            v => v["function"]["name"]
                .as_str()
                .map(|n| format!("function:{n}")),
        }
    }
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
    /// The served upstream reported no usage: `usage` (and the cost) is tandem's estimate, an
    /// upper bound.
    #[serde(default)]
    pub usage_estimated: bool,
    /// Upstream calls made for this request.
    #[serde(default)]
    pub tried: u32,
    /// A cascade of tiers: the tier that answered (0 = the cheapest) and how many tiers were
    /// called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier_index: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiers_called: Option<usize>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_kept_whole_less_tandem() {
        let r = ChatRequest::parse(
            br#"{"model":"t","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":64,
                "future":{"a":1},"tandem":{"no_learn":true},"logprobs":true,"top_logprobs":3}"#,
        )
        .unwrap();
        assert_eq!(r.body["max_completion_tokens"], 64);
        assert_eq!(r.body["future"]["a"], 1);
        assert!(!r.body.contains_key("tandem"));
        assert!(!r.body.contains_key("max_tokens"));
        assert_eq!(r.logprobs, Some(3));
        assert!(r.tandem.unwrap().no_learn);
    }

    /// A body that is JSON but not an object says so, in the client's terms.
    #[test]
    fn a_body_that_is_not_an_object_says_so() {
        for body in ["[]", "[1, 2]", "\"hi\"", "3", "null", "true"] {
            let e = ChatRequest::parse(body.as_bytes())
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains("the body must be a JSON object") && !e.contains("Known"),
                "{body}: {e}"
            );
        }
    }

    #[test]
    fn bad_requests_name_the_field() {
        for (body, want) in [
            (&br#"{"model":"t"}"#[..], "missing field `messages`"),
            (br#"[1]"#, "invalid JSON"),
            (
                br#"{"model":"t","messages":[],"top_logprobs":50}"#,
                "top_logprobs",
            ),
            (br#"{"model":"t","messages":[],"n":0}"#, "`n`"),
            (
                br#"{"model":"t","messages":[],"tandem":{"colour":1}}"#,
                "colour",
            ),
        ] {
            let e = ChatRequest::parse(body).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn tool_calls_are_part_of_a_messages_text() {
        let m: ChatMessage = serde_json::from_str(
            r#"{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function",
                "function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]}"#,
        )
        .unwrap();
        assert_eq!(m.text(), r#"get_weather({"city":"Paris"})"#);
    }
}
