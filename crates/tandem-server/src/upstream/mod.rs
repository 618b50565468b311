//! Upstreams: where answers come from. An OpenAI-compatible HTTP endpoint or a GGUF model run
//! in-process; both return a [`Completion`] with the per-token signals the cascade gates read.

mod gguf;
mod http;

use crate::config::{Upstream as UpstreamCfg, UpstreamKind, Validated};
use crate::error::GatewayError;
use crate::openai::ChatMessage;
use serde_json::{Map, Value};
use std::time::Duration;
use tandem_core::{Micros, Price, Usage};

/// One upstream answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub finish_reason: String,
    pub usage: Usage,
    /// Log-probability of each generated token, when the upstream gives them.
    pub token_logprobs: Option<Vec<f32>>,
    /// Energy of each token's distribution (E-LANG): −logsumexp of the raw logits in-process; for
    /// HTTP upstreams, −logsumexp of the returned top log-probabilities (the log of the mass the
    /// top candidates hold — what can be had from a black box).
    pub token_energies: Option<Vec<f32>>,
    /// Time spent upstream, subtracted from the gateway's overhead.
    pub elapsed: Duration,
}

/// One event of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    /// The end: why it stopped, and the token counts when the upstream reported them.
    Done {
        finish_reason: String,
        usage: Option<Usage>,
    },
}

/// A streamed answer: pieces until `Done`, or an error (timeout, a cut stream, garbage).
pub type Pieces = tokio::sync::mpsc::Receiver<Result<Piece, GatewayError>>;

/// What to ask an upstream.
#[derive(Debug, Clone)]
pub struct Call {
    pub messages: Vec<ChatMessage>,
    pub max_tokens: u32,
    /// Ask for token log-probabilities (the small model in a cascade).
    pub logprobs: bool,
    /// The client's other fields (temperature, tools, ...), forwarded to HTTP upstreams.
    pub extra: Map<String, Value>,
}

enum Backend {
    Http(http::HttpBackend),
    Gguf(gguf::GgufBackend),
}

pub struct Upstream {
    pub name: String,
    pub price: Price,
    timeouts: Timeouts,
    backend: Backend,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub total: Duration,
    /// For streams: until the first piece of text.
    pub first_token: Duration,
    /// For streams: between two pieces.
    pub idle: Duration,
}

impl Upstream {
    /// Builds every configured upstream. GGUF models load here, so a missing asset fails at start.
    pub fn build_all(cfg: &Validated) -> Result<Vec<Upstream>, GatewayError> {
        let client = http::client(&cfg.upstreams)?;
        cfg.upstreams
            .iter()
            .map(|u| Upstream::build(u, &client))
            .collect()
    }

    fn build(u: &UpstreamCfg, client: &reqwest::Client) -> Result<Upstream, GatewayError> {
        let backend = match u.cfg.kind {
            UpstreamKind::Openai => Backend::Http(http::HttpBackend::new(&u.cfg, client.clone())?),
            UpstreamKind::Gguf => Backend::Gguf(gguf::GgufBackend::load(&u.cfg)?),
        };
        let total = Duration::from_millis(u.cfg.timeout_ms);
        Ok(Upstream {
            name: u.cfg.name.clone(),
            price: u.price,
            timeouts: Timeouts {
                total,
                first_token: u
                    .cfg
                    .first_token_timeout_ms
                    .map_or(total, Duration::from_millis),
                idle: u.cfg.idle_timeout_ms.map_or(total, Duration::from_millis),
            },
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
        out
    }

    /// Starts a streamed call. Errors before the upstream accepted the call come back here (so
    /// the client gets a proper status); later ones arrive as the stream's last item.
    pub async fn stream(&self, call: &Call) -> Result<Pieces, GatewayError> {
        let out = match &self.backend {
            Backend::Http(h) => h.stream(&self.name, call, self.timeouts).await,
            Backend::Gguf(g) => g.stream(&self.name, call, self.timeouts.total).await,
        };
        let status = if out.is_ok() { "ok" } else { "error" };
        metrics::counter!("tandem_upstream_streams_total", "upstream" => self.name.clone(), "status" => status)
            .increment(1);
        out
    }

    /// Prompt tokens, bounded above: every byte a token, plus a few per message for the template.
    pub fn input_token_bound(messages: &[ChatMessage]) -> u64 {
        messages
            .iter()
            .map(|m| m.text().len() as u64 + 8)
            .sum::<u64>()
            + 8
    }

    /// An upper bound of a call's cost, reserved against the budget before the call: every byte of
    /// the prompt counted as a token (byte-level tokenizers never do worse) plus a few per message
    /// for the chat template, and the full token cap of output.
    pub fn estimate(&self, messages: &[ChatMessage], max_tokens: u32) -> Micros {
        self.price.cost(Usage {
            input_tokens: Self::input_token_bound(messages),
            output_tokens: u64::from(max_tokens),
        })
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
