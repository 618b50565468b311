//! Upstreams: where answers come from. An OpenAI-compatible HTTP endpoint or a GGUF model run
//! in-process. A [`Call`] is the client's body with this call's few changes; a [`Completion`] is
//! the upstream's answer whole, with the views the gates and the budget read off it.

mod gguf;
mod http;

use crate::config::{Upstream as UpstreamCfg, UpstreamKind, Validated};
use crate::error::GatewayError;
use crate::openai::{call_text, ChatMessage};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;
use tandem_core::{Micros, Price, Usage};

/// Top alternatives per token a gate asks for (E-LANG's energy over a black box's top-k).
pub const GATE_TOP_LOGPROBS: u32 = 5;

/// What to send an upstream: the client's body, less what this call changes.
#[derive(Debug, Clone)]
pub struct Call {
    /// The client's JSON object (less `tandem`).
    pub base: Arc<Map<String, Value>>,
    /// Fields this call sets (`Some`) or removes (`None`) over `base`. `model` and `stream` are
    /// the backend's to set.
    pub set: Vec<(String, Option<Value>)>,
}

impl Call {
    pub fn new(base: Arc<Map<String, Value>>) -> Call {
        Call {
            base,
            set: Vec::new(),
        }
    }

    /// Sets (or with `None` removes) a field for this call.
    pub fn with(mut self, field: &str, v: Option<Value>) -> Call {
        self.set.retain(|(k, _)| k != field);
        self.set.push((field.to_string(), v));
        self
    }

    /// A field as this call sends it.
    pub fn get(&self, field: &str) -> Option<&Value> {
        match self.set.iter().rev().find(|(k, _)| k == field) {
            Some((_, v)) => v.as_ref(),
            None => self.base.get(field),
        }
    }

    pub fn messages(&self) -> Vec<ChatMessage> {
        self.get("messages")
            .and_then(|m| serde_json::from_value(m.clone()).ok())
            .unwrap_or_default()
    }

    /// The token cap the call carries (`max_completion_tokens`, else `max_tokens`).
    pub fn token_cap(&self) -> Option<u64> {
        self.get("max_completion_tokens")
            .or_else(|| self.get("max_tokens"))
            .and_then(Value::as_u64)
    }

    /// Choices asked for.
    pub fn n(&self) -> u64 {
        self.get("n").and_then(Value::as_u64).unwrap_or(1).max(1)
    }

    /// The body as sent to an upstream: every field of the client's body and this call's, in
    /// order, with `extra` (the backend's `model`, `stream`, ...) last.
    pub fn outgoing<'a>(&'a self, extra: &'a [(&'a str, Value)]) -> Outgoing<'a> {
        Outgoing { call: self, extra }
    }

    /// Prompt tokens, bounded above: every byte of every forwarded field a token (a byte-level
    /// tokenizer never does worse), a few per message for the chat template, and each image,
    /// audio or file part as `media_tokens` instead of its bytes.
    pub fn input_bound(&self, media_tokens: u64) -> u64 {
        let mut total = 16u64;
        let mut keys: Vec<&str> = Vec::new();
        for (k, v) in self.set.iter().rev() {
            if !keys.contains(&k.as_str()) {
                keys.push(k);
                if let Some(v) = v {
                    total += k.len() as u64 + bound(v, media_tokens);
                }
            }
        }
        for (k, v) in self.base.iter() {
            if !keys.contains(&k.as_str()) {
                total += k.len() as u64 + bound(v, media_tokens);
            }
        }
        let messages = self
            .get("messages")
            .and_then(Value::as_array)
            .map_or(0, Vec::len) as u64;
        total + 8 * messages
    }
}

/// Bytes of a JSON value as text (an upper bound of its tokens), with media parts counted as
/// `media_tokens` each.
fn bound(v: &Value, media_tokens: u64) -> u64 {
    match v {
        Value::String(s) => s.len() as u64 + 2,
        Value::Array(a) => 2 + a.iter().map(|x| bound(x, media_tokens) + 1).sum::<u64>(),
        Value::Object(o) => {
            let media = o.get("type").and_then(Value::as_str).is_some_and(|t| {
                matches!(
                    t,
                    "image_url" | "input_image" | "image" | "input_audio" | "file" | "input_file"
                )
            });
            if media {
                return media_tokens;
            }
            2 + o
                .iter()
                .map(|(k, x)| k.len() as u64 + 4 + bound(x, media_tokens))
                .sum::<u64>()
        }
        Value::Number(n) => n.to_string().len() as u64,
        Value::Bool(_) => 5,
        Value::Null => 4,
    }
}

/// A [`Call`]'s body, serialised without copying it.
pub struct Outgoing<'a> {
    call: &'a Call,
    extra: &'a [(&'a str, Value)],
}

impl Serialize for Outgoing<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let overridden = |k: &str| {
            self.extra.iter().any(|(e, _)| *e == k) || self.call.set.iter().any(|(e, _)| e == k)
        };
        let mut m = s.serialize_map(None)?;
        for (k, v) in self.call.base.iter() {
            if !overridden(k) {
                m.serialize_entry(k, v)?;
            }
        }
        let mut seen: Vec<&str> = Vec::new();
        for (k, v) in self.call.set.iter().rev() {
            if seen.contains(&k.as_str()) || self.extra.iter().any(|(e, _)| e == k) {
                continue;
            }
            seen.push(k);
            if let Some(v) = v {
                m.serialize_entry(k, v)?;
            }
        }
        for (k, v) in self.extra {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// The first choice of an answer, as the gates judge it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draft {
    pub content: Option<String>,
    /// `tool_calls` as the upstream sent them (`{"id", "type", "function": {"name", "arguments"}}`).
    pub tool_calls: Vec<Value>,
    pub refusal: Option<String>,
    pub finish_reason: String,
}

impl Draft {
    /// Reads `choices[0]` of a response body.
    pub fn of(body: &Map<String, Value>) -> Draft {
        let c = body
            .get("choices")
            .and_then(|c| c.get(0))
            .unwrap_or(&Value::Null);
        let m = &c["message"];
        Draft {
            content: m["content"].as_str().map(str::to_string),
            tool_calls: m["tool_calls"].as_array().cloned().unwrap_or_default(),
            refusal: m["refusal"]
                .as_str()
                .filter(|r| !r.is_empty())
                .map(str::to_string),
            finish_reason: c["finish_reason"].as_str().unwrap_or("stop").to_string(),
        }
    }

    /// The answer as text: its content, then each tool call as `name(arguments)`; a refusal
    /// when there is nothing else.
    pub fn text(&self) -> String {
        let mut out = self.content.clone().unwrap_or_default();
        for c in &self.tool_calls {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&call_text(c));
        }
        if out.is_empty() {
            if let Some(r) = &self.refusal {
                out.push_str(r);
            }
        }
        out
    }
}

impl Draft {
    /// Bytes of everything the answer says (content, tool names and arguments, refusal): an
    /// upper bound of its output tokens when the upstream reports none.
    pub fn answer_bytes(&self) -> u64 {
        let calls: usize = self
            .tool_calls
            .iter()
            .map(|c| {
                c["function"]["name"].as_str().map_or(0, str::len)
                    + c["function"]["arguments"].as_str().map_or(0, str::len)
            })
            .sum();
        (self.content.as_deref().map_or(0, str::len)
            + calls
            + self.refusal.as_deref().map_or(0, str::len)) as u64
    }
}

/// One upstream answer, whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The upstream's response object as it came (`choices`, `usage`, `system_fingerprint`, ...).
    pub body: Map<String, Value>,
    pub draft: Draft,
    /// Tokens billed: the upstream's count, or tandem's upper-bound estimate.
    pub usage: Usage,
    /// The upstream reported no usage; `usage` is an estimate.
    pub usage_estimated: bool,
    /// Log-probability of each generated token of the first choice, when the upstream gave them.
    pub token_logprobs: Option<Vec<f32>>,
    /// Energy of each token's distribution (E-LANG): −logsumexp of the raw logits in-process; for
    /// HTTP upstreams, −logsumexp of the returned top log-probabilities (the log of the mass the
    /// top candidates hold — what can be had from a black box).
    pub token_energies: Option<Vec<f32>>,
    /// Time spent upstream, subtracted from the gateway's overhead.
    pub elapsed: Duration,
    /// The upstream that answered (its [`Upstream::index`]).
    pub by: usize,
}

impl Completion {
    pub fn text(&self) -> String {
        self.draft.text()
    }
}

/// What a backend returns; the [`Upstream`] fills in the usage estimate when `usage` is None.
pub(crate) struct Answered {
    pub body: Map<String, Value>,
    pub usage: Option<Usage>,
    pub token_logprobs: Option<Vec<f32>>,
    pub token_energies: Option<Vec<f32>>,
    pub elapsed: Duration,
}

/// One event of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// A chunk (`chat.completion.chunk`) as the upstream sent it, usage chunks included.
    Chunk(Map<String, Value>),
    /// The end, with the token counts when the upstream reported them.
    Done { usage: Option<Usage> },
}

/// A streamed answer: pieces until `Done`, or an error (timeout, a cut stream, garbage).
pub type Pieces = tokio::sync::mpsc::Receiver<Result<Piece, GatewayError>>;

/// Whether a chunk carries part of the answer (anything beyond the role; OpenAI's opening chunk
/// `{"role": "assistant", "content": ""}` does not): the first-token timeout ends there, and so
/// does the time a failed stream can still move to another upstream.
pub(crate) fn has_answer(c: &Map<String, Value>) -> bool {
    let says = |v: &Value| match v {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    };
    c.get("choices")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|ch| {
                ch["finish_reason"].is_string()
                    || ch["delta"]
                        .as_object()
                        .is_some_and(|d| d.iter().any(|(k, v)| k != "role" && says(v)))
            })
        })
}

/// Reads a stream up to its first piece of answer (or its end), which nothing has yet been sent
/// to the client for: a failure until then is the upstream's alone, and another upstream may
/// still serve. Returns the pieces read and the rest of the stream.
pub async fn until_answer(
    mut rx: Pieces,
    name: &str,
) -> Result<(Vec<Piece>, Pieces), GatewayError> {
    let mut head = Vec::new();
    loop {
        match rx.recv().await {
            Some(Ok(Piece::Chunk(c))) => {
                let answered = has_answer(&c);
                head.push(Piece::Chunk(c));
                if answered {
                    return Ok((head, rx));
                }
            }
            Some(Ok(done @ Piece::Done { .. })) => {
                head.push(done);
                return Ok((head, rx));
            }
            Some(Err(e)) => return Err(e),
            None => {
                return Err(GatewayError::Upstream {
                    upstream: name.to_string(),
                    reason: "the stream ended before any answer".into(),
                    sent: true,
                })
            }
        }
    }
}

/// The stream the client reads: `head`, then the rest of `rx`. `ticket` (the upstream's
/// concurrency slot and breaker probe) is held until the stream ends, and reports how it ended.
pub fn relay(head: Vec<Piece>, mut rx: Pieces, ticket: crate::resilience::Ticket) -> Pieces {
    let (tx, out) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        for p in head {
            let last = matches!(p, Piece::Done { .. });
            if tx.send(Ok(p)).await.is_err() {
                return; // the client left: the ticket is dropped unfinished
            }
            if last {
                ticket.finish(true);
                return;
            }
        }
        loop {
            let item = rx.recv().await;
            let ok = match &item {
                Some(Ok(Piece::Chunk(_))) => None,
                Some(Ok(Piece::Done { .. })) => Some(true),
                Some(Err(e)) => Some(!crate::resilience::Cure::of(e).blames_upstream()),
                None => Some(false),
            };
            let sent = match item {
                Some(it) => tx.send(it).await.is_ok(),
                None => true,
            };
            if let Some(ok) = ok {
                ticket.finish(ok);
                return;
            }
            if !sent {
                return;
            }
        }
    });
    out
}

enum Backend {
    Http(http::HttpBackend),
    Gguf(gguf::GgufBackend),
}

pub struct Upstream {
    pub name: String,
    /// Its place in the gateway's upstreams (what groups and answers name it by).
    pub index: usize,
    pub price: Price,
    /// Its breaker, concurrency limit and retry policy.
    pub health: Arc<crate::resilience::Health>,
    timeouts: Timeouts,
    pub cfg: crate::config::UpstreamConfig,
    backend: Backend,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A whole (non-streamed) call.
    pub total: Duration,
    /// For streams: until the first piece of the answer.
    pub first_token: Duration,
    /// For streams: between two pieces.
    pub idle: Duration,
    /// For streams: the whole stream, when capped.
    pub stream: Option<Duration>,
}

impl Upstream {
    /// Builds every configured upstream. GGUF models load here, so a missing asset fails at start.
    pub fn build_all(cfg: &Validated) -> Result<Vec<Upstream>, GatewayError> {
        let client = http::client(&cfg.upstreams)?;
        cfg.upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| Upstream::build(i, u, &client))
            .collect()
    }

    fn build(
        index: usize,
        u: &UpstreamCfg,
        client: &reqwest::Client,
    ) -> Result<Upstream, GatewayError> {
        let backend = match u.cfg.kind {
            UpstreamKind::Openai => Backend::Http(http::HttpBackend::new(&u.cfg, client.clone())?),
            UpstreamKind::Gguf => Backend::Gguf(gguf::GgufBackend::load(&u.cfg)?),
        };
        let total = Duration::from_millis(u.cfg.timeout_ms);
        Ok(Upstream {
            name: u.cfg.name.clone(),
            index,
            health: Arc::new(crate::resilience::Health::new(
                &u.cfg.name,
                u.cfg.retry.clone(),
                u.cfg.breaker.clone(),
                u.cfg.max_concurrency,
            )),
            price: u.price,
            timeouts: Timeouts {
                total,
                first_token: u
                    .cfg
                    .first_token_timeout_ms
                    .map_or(total, Duration::from_millis),
                idle: u.cfg.idle_timeout_ms.map_or(total, Duration::from_millis),
                stream: u.cfg.stream_timeout_ms.map(Duration::from_millis),
            },
            cfg: u.cfg.clone(),
            backend,
        })
    }

    /// One call, bounded by the upstream's total timeout.
    pub async fn complete(&self, call: &Call) -> Result<Completion, GatewayError> {
        let t0 = std::time::Instant::now();
        let out = match &self.backend {
            Backend::Http(h) => h.complete(&self.name, call, self.timeouts.total).await,
            Backend::Gguf(g) => g.complete(&self.name, call, self.timeouts.total).await,
        };
        let secs = t0.elapsed().as_secs_f64();
        let status = if out.is_ok() { "ok" } else { "error" };
        metrics::histogram!("tandem_upstream_seconds", "upstream" => self.name.clone(), "status" => status)
            .record(secs);
        let a = out?;
        let draft = Draft::of(&a.body);
        let (usage, usage_estimated) = match a.usage {
            Some(u) => (u, false),
            None => (self.usage_estimate(call, &draft), true),
        };
        Ok(Completion {
            body: a.body,
            draft,
            usage,
            usage_estimated,
            token_logprobs: a.token_logprobs,
            token_energies: a.token_energies,
            elapsed: a.elapsed,
            by: self.index,
        })
    }

    /// Starts a streamed call. Errors before the upstream accepted the call come back here (so
    /// the client gets a proper status); later ones arrive as the stream's last item.
    pub async fn stream(&self, call: &Call) -> Result<Pieces, GatewayError> {
        let out = match &self.backend {
            Backend::Http(h) => h.stream(&self.name, call, self.timeouts).await,
            Backend::Gguf(g) => g.stream(&self.name, call, self.timeouts).await,
        };
        let status = if out.is_ok() { "ok" } else { "error" };
        metrics::counter!("tandem_upstream_streams_total", "upstream" => self.name.clone(), "status" => status)
            .increment(1);
        out
    }

    /// Output tokens the call may produce, over all its choices.
    pub fn output_bound(&self, call: &Call) -> u64 {
        call.token_cap()
            .unwrap_or(u64::from(self.cfg.max_output_tokens))
            .saturating_mul(call.n())
    }

    /// An upper bound of a call's cost, reserved against the budget before the call: the whole
    /// body as sent (tools, schemas, hints: every byte a token, media parts at their bound) and
    /// the full output bound.
    pub fn estimate(&self, call: &Call) -> Micros {
        self.price.cost(Usage {
            input_tokens: call.input_bound(self.cfg.image_tokens),
            output_tokens: self.output_bound(call),
        })
    }

    /// What a call whose upstream reported no usage is charged: the input bound, and the
    /// answer's bytes as tokens (within the output bound). Never zero for a real call.
    pub fn usage_estimate(&self, call: &Call, answer: &Draft) -> Usage {
        Usage {
            input_tokens: call.input_bound(self.cfg.image_tokens),
            output_tokens: answer.answer_bytes().min(self.output_bound(call)).max(1),
        }
    }

    pub fn cost(&self, usage: Usage) -> Micros {
        self.price.cost(usage)
    }
}

/// E-LANG over a distribution known only by its top log-probabilities.
pub(crate) fn energy_of_top(top: &[f32]) -> f32 {
    let max = top.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return 0.0;
    }
    -(max + top.iter().map(|l| (l - max).exp()).sum::<f32>().ln())
}

/// Reads a `usage` object: None when absent, null or without token counts.
pub(crate) fn usage_of(v: Option<&Value>) -> Option<Usage> {
    let u = v.filter(|u| u.is_object())?;
    let input = u["prompt_tokens"].as_u64();
    let output = u["completion_tokens"].as_u64();
    if input.is_none() && output.is_none() {
        return None;
    }
    Some(Usage {
        input_tokens: input.unwrap_or(0),
        output_tokens: output.unwrap_or(0),
    })
}

/// Per-token log-probabilities and energies, when an answer carries them.
pub(crate) type TokenSignals = (Option<Vec<f32>>, Option<Vec<f32>>);

/// `usage` in OpenAI's shape (the inverse of [`usage_of`]).
pub(crate) fn usage_json(u: Usage) -> Value {
    serde_json::json!({
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
    })
}

/// Token log-probabilities (and energies from the top alternatives) of a choice's `logprobs`.
pub(crate) fn logprob_signals(logprobs: &Value) -> Result<TokenSignals, String> {
    let (mut lps, mut energies) = (Vec::new(), Vec::new());
    if let Some(items) = logprobs["content"].as_array() {
        for it in items {
            let Some(lp) = it["logprob"].as_f64() else {
                return Err("a token without `logprob`".into());
            };
            lps.push(lp as f32);
            if let Some(top) = it["top_logprobs"].as_array().filter(|t| !t.is_empty()) {
                let t: Vec<f32> = top
                    .iter()
                    .filter_map(|x| x["logprob"].as_f64())
                    .map(|x| x as f32)
                    .collect();
                energies.push(energy_of_top(&t));
            }
        }
    }
    let has_energy = !energies.is_empty() && energies.len() == lps.len();
    Ok((
        (!lps.is_empty()).then_some(lps),
        has_energy.then_some(energies),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(v: Value) -> Call {
        match v {
            Value::Object(m) => Call::new(Arc::new(m)),
            _ => unreachable!(),
        }
    }

    #[test]
    fn outgoing_keeps_the_body_and_applies_the_changes() {
        let c =
            call(json!({"model": "t", "messages": [], "max_completion_tokens": 64, "x": {"y": 1}}))
                .with("logprobs", Some(json!(true)))
                .with("x", None);
        let out =
            serde_json::to_value(c.outgoing(&[("model", json!("m")), ("stream", json!(false))]))
                .unwrap();
        assert_eq!(
            out,
            json!({"model": "m", "messages": [], "max_completion_tokens": 64, "logprobs": true, "stream": false})
        );
        assert_eq!(c.token_cap(), Some(64));
    }

    #[test]
    fn the_input_bound_counts_every_field_and_media_at_their_bound() {
        let tools: Vec<Value> = (0..20)
            .map(|i| json!({"type": "function", "function": {"name": format!("tool_{i}"), "description": "x".repeat(280), "parameters": {"type": "object"}}}))
            .collect();
        let plain = call(json!({"messages": [{"role": "user", "content": "hi"}]}));
        let with_tools =
            call(json!({"messages": [{"role": "user", "content": "hi"}], "tools": tools}));
        let text_len = serde_json::to_string(&*with_tools.base).unwrap().len() as u64;
        assert!(
            with_tools.input_bound(100) >= text_len,
            "bound ≥ the body's bytes"
        );
        assert!(plain.input_bound(100) < 100);
        let image = call(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", "A".repeat(50_000))}}]}]}));
        let b = image.input_bound(1600);
        assert!(
            (1600..2000).contains(&b),
            "{b}: the image counts 1600, not its bytes"
        );
    }

    #[test]
    fn drafts_read_content_tool_calls_and_refusals() {
        let body = json!({"choices": [{"message": {"content": null, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
            "finish_reason": "tool_calls"}]});
        let d = Draft::of(body.as_object().unwrap());
        assert_eq!(d.text(), "f({\"a\":1})");
        assert_eq!(d.finish_reason, "tool_calls");
        let body = json!({"choices": [{"message": {"content": null, "refusal": "I can't"}}]});
        assert_eq!(Draft::of(body.as_object().unwrap()).text(), "I can't");
    }

    #[test]
    fn usage_absent_or_null_is_none() {
        assert_eq!(usage_of(None), None);
        assert_eq!(usage_of(Some(&Value::Null)), None);
        assert_eq!(usage_of(Some(&json!({}))), None);
        assert_eq!(
            usage_of(Some(&json!({"prompt_tokens": 3, "completion_tokens": 2}))),
            Some(Usage {
                input_tokens: 3,
                output_tokens: 2
            })
        );
    }
}
