//! The gateway's TOML configuration: parsed with unknown fields refused, then validated as a whole
//! (every route names upstreams that exist, prices and budgets make sense) so a bad file fails at
//! start with the field and value at fault, never at the first request.

use crate::resilience::{BreakerConfig, Group, RetryConfig};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tandem_core::money::{micros_to_usd, usd_to_micros};
use tandem_core::{BudgetLimits, Micros, Price};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field} = {value}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        value: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(rename = "upstream", default)]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(rename = "route", default)]
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on; `tandem serve --port` overrides the port.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Environment variable holding the keys clients must present (comma-separated). Unset: no auth.
    pub api_keys_env: Option<String>,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Where learned state and counters persist. Relative paths are relative to the config file.
    pub state_dir: Option<PathBuf>,
    #[serde(default = "default_persist_s")]
    pub persist_interval_s: u64,
    /// How many recent responses can still receive feedback.
    #[serde(default = "default_feedback_window")]
    pub feedback_window: usize,
    /// Browser access from other origins (`[server.cors]`). Unset: no CORS headers at all.
    pub cors: Option<CorsConfig>,
    /// Longest wait for a request's headers, in ms; also how long a kept-alive connection may
    /// sit idle between two requests. A client that trickles its headers is disconnected.
    /// Default 10,000.
    #[serde(default = "default_header_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Longest wait for a request's whole body, in ms, from the first attempt to read it: past
    /// it, 408 (a body trickled a byte at a time ends there too). Default 30,000.
    #[serde(default = "default_body_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// Open client connections at most (default 4,096). Past it, a new connection is answered
    /// 503 `overloaded` with `Retry-After: 1` and closed, rather than left waiting in the listen
    /// queue. Each connection is an open file: at start the gateway raises its soft open-file
    /// limit to the hard one and, if this cap is above half of it (the other half is for
    /// upstream connections and files), lowers the cap to that with a warning. HTTP/1 clients
    /// hold one connection per request in flight, so size it to your clients' peak concurrency
    /// with headroom (an idle one costs some tens of KB).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests in flight at most (a stream until its body ends; default 1,024). Past it, 503
    /// `overloaded` with `Retry-After: 1` at once (load shedding), never a queue. A request in
    /// flight costs memory (its body, up to `max_body_bytes`) and an upstream connection, and
    /// little CPU while it waits: size it to peak requests per second × the upstreams' p99
    /// latency in seconds (a stream's whole length), with headroom. Overload of the CPU shows
    /// as requests piling up here, so a cap near that figure sheds an overload within about
    /// cap ÷ throughput seconds instead of letting every request's latency grow.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// On shutdown, how long requests in flight get to finish (seconds; default 10) before the
    /// connections still open are dropped; idle ones close at once, and the state and spend are
    /// saved either way.
    #[serde(default = "default_shutdown_grace_s")]
    pub shutdown_grace_s: u64,
    /// Replicas behind one load balancer share route budgets, feedback records and learning
    /// through one Redis (`[server.shared]`). Unset: this process holds everything itself.
    pub shared: Option<SharedSection>,
}

/// `[server.shared]`: what gateway replicas share through Redis ([`crate::shared`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedSection {
    /// `redis://[[user]:password@]host[:port][/db]` (or `rediss://` for TLS). Give this or
    /// `redis_url_env`, not both.
    pub redis_url: Option<String>,
    /// Environment variable holding the URL, so a password stays out of the file.
    pub redis_url_env: Option<String>,
    /// Namespace of this deployment's keys (`tandem:{prefix}:…`): every replica of one
    /// deployment uses the same. Letters, digits, `_`, `-`, `.`. Default `default`.
    #[serde(default = "default_shared_prefix")]
    pub prefix: String,
    /// What a replica does while Redis is unreachable: `{ mode = "fail_closed" }` (default: no
    /// large calls) or `{ mode = "fail_open", share = 0.25 }` (spend up to that share of what
    /// remained of each cap, on its own, and add it to Redis when Redis returns).
    #[serde(default)]
    pub on_redis_down: crate::shared::OnRedisDown,
    /// Longest wait for one Redis operation, in ms (default 500); past it Redis counts as down.
    #[serde(default = "default_shared_op_timeout_ms")]
    pub op_timeout_ms: u64,
    /// How long a reservation may stay open before it is presumed to belong to a dead replica
    /// and kept as spent at its estimate, in seconds (default 900). Longer than any call or
    /// stream lasts, or that call is counted at its estimate instead of its cost.
    #[serde(default = "default_shared_hold_s")]
    pub hold_s: u64,
    /// How long a response can still take feedback through another replica, in seconds
    /// (default 86,400).
    #[serde(default = "default_shared_feedback_ttl_s")]
    pub feedback_ttl_s: u64,
    /// Names this replica in Redis (reservation ids, learning records); default: the host name
    /// and process id.
    pub replica_id: Option<String>,
}

fn default_shared_prefix() -> String {
    "default".into()
}
fn default_shared_op_timeout_ms() -> u64 {
    500
}
fn default_shared_hold_s() -> u64 {
    900
}
fn default_shared_feedback_ttl_s() -> u64 {
    86_400
}

fn default_header_timeout_ms() -> u64 {
    10_000
}
fn default_body_timeout_ms() -> u64 {
    30_000
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_in_flight() -> usize {
    1024
}
fn default_shutdown_grace_s() -> u64 {
    10
}

/// `[server.cors]`: which web origins may call the gateway from a browser.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// `["*"]` for any origin, else origins such as `"https://app.example"` (scheme, host and
    /// optional port; no path). Validation normalises them to the form browsers send.
    pub allow_origins: Vec<String>,
    /// How long browsers may cache a preflight answer (`Access-Control-Max-Age`), in seconds.
    pub max_age_s: Option<u64>,
}

/// An origin as browsers send it in `Origin` (lowercase scheme and host, default port left out),
/// or why `s` is not an http(s) origin. A browser's `Origin` is matched byte for byte, so a
/// configured `https://App.example:443` must become `https://app.example` to ever match.
pub fn normalize_origin(s: &str) -> Result<String, &'static str> {
    let uri: axum::http::Uri = s
        .parse()
        .map_err(|_| "is not an origin such as https://app.example")?;
    let scheme = match uri.scheme_str() {
        Some(x) if x.eq_ignore_ascii_case("http") => "http",
        Some(x) if x.eq_ignore_ascii_case("https") => "https",
        _ => return Err("must start with http:// or https:// (or be \"*\" alone)"),
    };
    let Some(auth) = uri.authority() else {
        return Err("is not an origin such as https://app.example");
    };
    if auth.as_str().contains('@') {
        return Err("an origin has no user name or password");
    }
    // `https://a.example/` parses with path `/`; browsers never send a path, not even that one.
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/")
        || s.ends_with('/')
        || s.contains('#')
    {
        return Err("an origin has no path (not even a trailing `/`), query or fragment");
    }
    let host = auth.host().to_ascii_lowercase();
    if host.is_empty() {
        return Err("is not an origin such as https://app.example");
    }
    match (scheme, auth.port_u16()) {
        (_, None) | ("http", Some(80)) | ("https", Some(443)) => Ok(format!("{scheme}://{host}")),
        (_, Some(p)) => Ok(format!("{scheme}://{host}:{p}")),
    }
}

/// `[server.shared]` checked before anything connects: (field, value, reason) at fault.
fn validate_shared(sh: &SharedSection) -> Result<(), (&'static str, String, String)> {
    match (&sh.redis_url, &sh.redis_url_env) {
        (Some(_), Some(_)) => {
            return Err((
                "redis_url_env",
                sh.redis_url_env.clone().unwrap_or_default(),
                "give redis_url or redis_url_env, not both".into(),
            ))
        }
        (None, None) => {
            return Err((
                "redis_url",
                "(missing)".into(),
                "name the Redis replicas share (or redis_url_env)".into(),
            ))
        }
        (Some(u), None) if !(u.starts_with("redis://") || u.starts_with("rediss://")) => {
            return Err((
                "redis_url",
                crate::shared::redact_url(u),
                "must start with redis:// or rediss://".into(),
            ))
        }
        (Some(u), None) => {
            // Parsed only (no connection): a URL `serve` would refuse fails `--check` too.
            if let Err(e) = redis::Client::open(u.as_str()) {
                return Err((
                    "redis_url",
                    crate::shared::redact_url(u),
                    format!("is not a Redis URL: {e}"),
                ));
            }
        }
        _ => {}
    }
    let prefix_ok = sh
        .prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if sh.prefix.is_empty() || sh.prefix.len() > 64 || !prefix_ok {
        return Err((
            "prefix",
            sh.prefix.clone(),
            "1 to 64 letters, digits, `_`, `-` or `.`".into(),
        ));
    }
    if let Some(r) = &sh.replica_id {
        if r.is_empty() || r.len() > 128 || r.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err((
                "replica_id",
                r.clone(),
                "1 to 128 characters, no spaces".into(),
            ));
        }
    }
    sh.on_redis_down
        .validate()
        .map_err(|why| ("on_redis_down", format!("{:?}", sh.on_redis_down), why))?;
    for (field, v, lo, hi) in [
        ("op_timeout_ms", sh.op_timeout_ms, 1, 60_000),
        ("hold_s", sh.hold_s, 10, 7 * 86_400),
        ("feedback_ttl_s", sh.feedback_ttl_s, 1, 30 * 86_400),
    ] {
        if !(lo..=hi).contains(&v) {
            return Err((field, v.to_string(), format!("must be {lo} to {hi}")));
        }
    }
    Ok(())
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: default_listen(),
            api_keys_env: None,
            max_body_bytes: default_max_body(),
            state_dir: None,
            persist_interval_s: default_persist_s(),
            feedback_window: default_feedback_window(),
            cors: None,
            header_read_timeout_ms: default_header_timeout_ms(),
            body_read_timeout_ms: default_body_timeout_ms(),
            max_connections: default_max_connections(),
            max_in_flight: default_max_in_flight(),
            shutdown_grace_s: default_shutdown_grace_s(),
            shared: None,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_max_body() -> usize {
    1 << 20
}
fn default_persist_s() -> u64 {
    30
}
fn default_feedback_window() -> usize {
    10_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamKind {
    /// Any OpenAI-compatible HTTP endpoint.
    Openai,
    /// A GGUF model from the installed assets, run in-process.
    Gguf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    pub kind: UpstreamKind,
    /// `openai`: the base URL up to and including `/v1`.
    pub base_url: Option<String>,
    /// `openai`: the environment variable holding the API key (never the key itself).
    pub api_key_env: Option<String>,
    /// `openai`: the model name sent upstream.
    pub model: Option<String>,
    /// `gguf`: the asset id (`tandem assets list`).
    pub asset: Option<String>,
    /// `token:IN[:OUT]` dollars per million tokens, or `call:USD`.
    #[serde(default = "default_price")]
    pub price: String,
    #[serde(default = "default_total_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// Streams: longest wait for the first piece of text (default: `timeout_ms`).
    pub first_token_timeout_ms: Option<u64>,
    /// Streams: longest wait between two pieces (default: `timeout_ms`).
    pub idle_timeout_ms: Option<u64>,
    /// Streams: an optional cap on a stream's whole length (`timeout_ms` does not cut streams that
    /// keep producing).
    pub stream_timeout_ms: Option<u64>,
    /// `openai`: the upstream returns token log-probabilities when asked (`logprobs`,
    /// `top_logprobs`). A cascade gated on log-probabilities or energy asks its small upstream
    /// for them, which a backend without them refuses: so it must be declared. In-process GGUF
    /// models always can.
    pub logprobs: Option<bool>,
    /// The upstream accepts `stream_options.include_usage`: tandem then asks for usage on every
    /// stream (and hides the usage chunk from clients that did not ask). Otherwise a stream's
    /// cost without the client's own usage request is estimated.
    #[serde(default)]
    pub stream_usage: bool,
    /// Upper bound of the tokens one image, audio or file content part costs, for the budget's
    /// reservation (their bytes are not tokens). Default 1,600; gpt-4o-mini's images bill ~37,000.
    #[serde(default = "default_image_tokens")]
    pub image_tokens: u64,
    /// Output tokens reserved when a request names no cap (`max_tokens` or
    /// `max_completion_tokens`): the model's own output limit.
    #[serde(default = "default_max_output_tokens")]
    pub max_output_tokens: u32,
    /// The field a route's `max_tokens` cap is sent in when the client sent none.
    #[serde(default)]
    pub token_param: TokenParam,
    /// `[upstream.retry]`: attempts per request on this upstream, backoff, `Retry-After`.
    #[serde(default)]
    pub retry: RetryConfig,
    /// `[upstream.breaker]`: when calls stop going to this upstream, and how they come back.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Calls in flight to this upstream at most; the next request of its group goes to another
    /// upstream, or waits when all are at their limit. Unset: no limit.
    pub max_concurrency: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenParam {
    #[default]
    MaxTokens,
    /// Newer (reasoning) models take only this one.
    MaxCompletionTokens,
}

impl TokenParam {
    pub fn field(self) -> &'static str {
        match self {
            TokenParam::MaxTokens => "max_tokens",
            TokenParam::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

impl UpstreamConfig {
    /// Whether the upstream can return token log-probabilities.
    pub fn gives_logprobs(&self) -> bool {
        match self.kind {
            UpstreamKind::Gguf => true,
            UpstreamKind::Openai => self.logprobs == Some(true),
        }
    }
}

fn default_image_tokens() -> u64 {
    1_600
}
fn default_max_output_tokens() -> u32 {
    16_384
}

fn default_price() -> String {
    "call:0".into()
}
fn default_total_ms() -> u64 {
    60_000
}
fn default_connect_ms() -> u64 {
    2_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    /// One upstream, no decision (still budgeted and metered).
    Fixed,
    /// The learned prompt router decides before any model runs.
    RouteBefore,
    /// The small model answers first; its answer is accepted or escalated.
    Cascade,
    /// LONDI: requests are steps of episodes (agent runs); a learned switching controller picks
    /// the model per step, trained by per-episode rewards sent as feedback.
    Switching,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CascadeGate {
    /// Escalate on low mean token log-probability of the small answer.
    Logprob,
    /// E-LANG: escalate on high mean token energy of the small answer.
    Energy,
    /// The learned cascade scorer (prompt and answer n-grams, answer signals, log-probs).
    Learned,
    /// OCL's learned deferral (one model per cheap tier imitating the top tier, with its
    /// cost-to-go; `tandem_core::policy::ocl`): runs on the cascade engine.
    Ocl,
    /// Random deferral at `target_share`, the baseline: runs on the cascade engine.
    Random,
}

impl CascadeGate {
    pub fn name(self) -> &'static str {
        match self {
            CascadeGate::Logprob => "logprob",
            CascadeGate::Energy => "energy",
            CascadeGate::Learned => "learned",
            CascadeGate::Ocl => "ocl",
            CascadeGate::Random => "random",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// Serve the small model when the large model's budget is spent.
    #[default]
    Small,
    /// Refuse with 429 in OpenAI's shape.
    Refuse,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// What clients put in `model`.
    pub name: String,
    pub kind: RouteKind,
    /// `fixed`: its upstream, or a group of them (see `small`).
    pub upstream: Option<toml::Value>,
    /// The small model: an upstream's name, or a group — a list of names tried in order
    /// (`["a", "b"]`), or of `{ upstream = "a", weight = 3 }` tables, the first drawn by weight.
    /// A failed call moves to the next upstream of the group.
    pub small: Option<toml::Value>,
    /// The large model: a name or a group, as `small`.
    pub large: Option<toml::Value>,
    /// `cascade`: its tiers, cheapest first (2 to 8), each a name or a group as `small`; instead
    /// of `small` and `large` (which are the two-tier form). Each tier's answer is judged by
    /// the route's gate (`logprob`, `energy`, `ocl` or `random`) and every step up reserves its
    /// price against the route's budget first.
    pub tiers: Option<Vec<toml::Value>>,
    /// Share of requests sent to the large model, held online (route_before, cascade).
    pub target_share: Option<f64>,
    /// `cascade` with a fixed threshold instead of a share: escalate when the score exceeds it.
    pub threshold: Option<f32>,
    #[serde(default = "default_gate")]
    pub gate: CascadeGate,
    /// Share of requests on which both models run, so that both outcomes are learned.
    #[serde(default = "default_explore")]
    pub explore: f64,
    /// S4L: the small model's draft goes into the large model's prompt on escalation.
    #[serde(default)]
    pub s4l: bool,
    /// A cap on output tokens for this route's calls: a client's larger cap is lowered to it, and
    /// a request without one gets it (in the upstream's `token_param` field). Unset: requests go
    /// upstream as the client sent them.
    pub max_tokens: Option<u32>,
    /// Longest a request may wait for its answer across every attempt and model (ms): retries,
    /// backoffs and fallbacks stop there and the client gets 504 `deadline_exceeded`. A stream
    /// is bound until its first piece of answer; after that its own timeouts govern. Unset:
    /// only each attempt's own timeouts bound it (so several hanging upstreams add up).
    pub deadline_ms: Option<u64>,
    #[serde(default)]
    pub budget: RouteBudget,
    #[serde(default)]
    pub on_exhausted: OnExhausted,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `switching`: the controller's settings (`cost`, `budget` of large calls per episode, ...).
    pub switching: Option<tandem_core::londi::SwitchConfig>,
    /// `route_before`: the router's weight on the large call's price, 0 to 1 (0: the quality
    /// gain alone; 1: the gain per dollar, so long, dear prompts go large less often).
    pub cost_weight: Option<f32>,
    /// A router trained beforehand (`tandem train --out`, relative to this file): a
    /// `route_before` route starts its router from it, a two-model `cascade` with gate
    /// `learned` its cascade scorer; they keep learning. A state file, once written, wins.
    pub prior: Option<PathBuf>,
    /// `route_before`: the router also reads each prompt's sentence vector (`"minilm"`:
    /// all-MiniLM-L6-v2 in-process, from the `minilm` asset), beside its n-grams, and mixes in a
    /// nearest-neighbour estimate over past prompts. Vectors are cached by prompt (the last
    /// 100,000); a prompt is encoded once, off the async threads.
    pub embeddings: Option<EmbeddingsKind>,
}

/// The sentence encoders a router may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingsKind {
    Minilm,
}

/// The call tiers' prices are compared on: 1,000 tokens in and 1,000 out.
const REFERENCE_CALL: tandem_core::Usage = tandem_core::Usage {
    input_tokens: 1000,
    output_tokens: 1000,
};

/// The most tiers a cascade route may have.
pub const MAX_TIERS: usize = 8;

/// What an engine cascade's gate needs: `logprob` a share or a threshold, `energy`, `random` a
/// share, `ocl` either (a share held online, or μ fixed at its default), `learned` is for two
/// models only. Errors name the field.
fn check_engine_gate(r: &RouteConfig) -> Result<(), (&'static str, String, String)> {
    match r.gate {
        CascadeGate::Learned => Err((
            "gate",
            "learned".into(),
            "scores two models; a cascade of tiers uses logprob, energy, ocl or random".into(),
        )),
        CascadeGate::Energy | CascadeGate::Random if r.target_share.is_none() => Err((
            "target_share",
            "(missing)".into(),
            format!(
                "gate = \"{}\" on tiers holds a share of top-tier calls",
                r.gate.name()
            ),
        )),
        CascadeGate::Ocl | CascadeGate::Random if r.threshold.is_some() => Err((
            "threshold",
            "(set)".into(),
            format!(
                "gate = \"{}\" takes no threshold; set target_share to hold a share",
                r.gate.name()
            ),
        )),
        _ => Ok(()),
    }
}

fn default_gate() -> CascadeGate {
    CascadeGate::Logprob
}
fn default_explore() -> f64 {
    0.05
}
fn default_seed() -> u64 {
    7
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteBudget {
    /// Large-model spend cap per window, in dollars.
    pub max_usd: Option<f64>,
    pub max_calls: Option<u64>,
    /// Window length; unset: one window for the life of the state.
    pub window_s: Option<u64>,
}

/// A validated route: upstream names resolved to groups of indices.
#[derive(Debug, Clone)]
pub struct Route {
    pub cfg: RouteConfig,
    pub small: Option<Group>,
    /// The large model's group (a fixed route's upstream).
    pub large: Option<Group>,
    /// A cascade run by the engine (`tiers`, or a gate only the engine has): every tier's
    /// group, cheapest first (`small` is the first, `large` the last). Empty otherwise.
    pub tiers: Vec<Group>,
    pub limits: BudgetLimits,
    /// The prior the route's learned model starts from, loaded and checked.
    pub prior: Option<std::sync::Arc<tandem_core::prior::Prior>>,
    /// The encoder a route-before router reads prompts' vectors from (`embeddings`).
    pub embedder: Option<std::sync::Arc<dyn tandem_core::embed::Embedder>>,
    /// The large model's price (its group's dearest upstream at a call of 1,000 tokens in and
    /// out), for a cost-aware router.
    pub large_price: Option<tandem_core::Price>,
}

impl Route {
    /// A two-model route (`small`/`large`) whose two-model gate decides: a route-before router,
    /// or a cascade gated on the small model's log-probabilities, energy or learned scorer. It
    /// runs on the engine as two tiers, with that gate as the policy, and keeps the two-model
    /// form's edges (see `gateway::run::tiers`).
    pub fn is_two_model(&self) -> bool {
        match self.cfg.kind {
            RouteKind::RouteBefore => true,
            RouteKind::Cascade => {
                self.cfg.tiers.is_none()
                    && matches!(
                        self.cfg.gate,
                        CascadeGate::Logprob | CascadeGate::Energy | CascadeGate::Learned
                    )
            }
            RouteKind::Fixed | RouteKind::Switching => false,
        }
    }
}

/// A validated upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub cfg: UpstreamConfig,
    pub price: Price,
}

#[derive(Debug, Clone)]
pub struct Validated {
    pub server: ServerSection,
    pub upstreams: Vec<Upstream>,
    pub routes: Vec<Route>,
    /// Directory of the config file, for relative paths.
    pub base_dir: PathBuf,
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Validated, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: ServerConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        cfg.validate(path, base)
    }

    pub fn validate(mut self, path: &Path, base_dir: PathBuf) -> Result<Validated, ConfigError> {
        let bad =
            |field: String, value: &dyn std::fmt::Display, reason: &str| ConfigError::Invalid {
                path: path.to_path_buf(),
                field,
                value: value.to_string(),
                reason: reason.to_string(),
            };
        if self.server.max_body_bytes < 1024 {
            return Err(bad(
                "server.max_body_bytes".into(),
                &self.server.max_body_bytes,
                "must be at least 1024",
            ));
        }
        for (field, v) in [
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
            ),
            (
                "server.body_read_timeout_ms",
                self.server.body_read_timeout_ms,
            ),
            ("server.max_connections", self.server.max_connections as u64),
            ("server.max_in_flight", self.server.max_in_flight as u64),
        ] {
            if v == 0 {
                return Err(bad(field.into(), &0, "must be at least 1"));
            }
        }
        if let Some(sh) = &self.server.shared {
            validate_shared(sh).map_err(|(field, value, why)| {
                bad(format!("server.shared.{field}"), &value, &why)
            })?;
        }
        if self.server.feedback_window == 0 {
            return Err(bad(
                "server.feedback_window".into(),
                &0,
                "must be at least 1",
            ));
        }
        if let Some(cors) = &mut self.server.cors {
            let field = || "server.cors.allow_origins".to_string();
            if cors.allow_origins.is_empty() {
                return Err(bad(
                    field(),
                    &"[]",
                    "list the origins allowed (or \"*\"); without [server.cors] no origin is",
                ));
            }
            let mut normalized = Vec::with_capacity(cors.allow_origins.len());
            for o in &cors.allow_origins {
                if o == "*" {
                    if cors.allow_origins.len() > 1 {
                        return Err(bad(field(), o, "\"*\" allows every origin: list it alone"));
                    }
                    normalized.push(o.clone());
                } else {
                    normalized.push(normalize_origin(o).map_err(|why| bad(field(), o, why))?);
                }
            }
            cors.allow_origins = normalized;
        }
        let mut upstreams = Vec::new();
        let mut names = BTreeSet::new();
        for (i, u) in self.upstreams.into_iter().enumerate() {
            let at = |f: &str| format!("upstream[{i}].{f}");
            if !names.insert(u.name.clone()) {
                return Err(bad(at("name"), &u.name, "is used by two upstreams"));
            }
            let price = Price::parse(&u.price).map_err(|e| bad(at("price"), &u.price, &e))?;
            match u.kind {
                UpstreamKind::Openai => {
                    let Some(url) = &u.base_url else {
                        return Err(bad(
                            at("base_url"),
                            &"(missing)",
                            "an openai upstream needs a base URL",
                        ));
                    };
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(bad(
                            at("base_url"),
                            url,
                            "must start with http:// or https://",
                        ));
                    }
                    if u.model.is_none() {
                        return Err(bad(
                            at("model"),
                            &"(missing)",
                            "an openai upstream needs the model name to send",
                        ));
                    }
                    if u.asset.is_some() {
                        return Err(bad(at("asset"), &"(set)", "applies to gguf upstreams only"));
                    }
                }
                UpstreamKind::Gguf => {
                    if u.asset.is_none() {
                        return Err(bad(
                            at("asset"),
                            &"(missing)",
                            "a gguf upstream needs an asset id",
                        ));
                    }
                    for (f, set) in [
                        ("base_url", u.base_url.is_some()),
                        ("api_key_env", u.api_key_env.is_some()),
                        ("model", u.model.is_some()),
                    ] {
                        if set {
                            return Err(bad(at(f), &"(set)", "applies to openai upstreams only"));
                        }
                    }
                }
            }
            if u.kind == UpstreamKind::Gguf && u.logprobs.is_some() {
                return Err(bad(
                    at("logprobs"),
                    &"(set)",
                    "applies to openai upstreams (gguf models always give them)",
                ));
            }
            if u.max_output_tokens == 0 {
                return Err(bad(at("max_output_tokens"), &0, "must be at least 1"));
            }
            for (f, v) in [
                ("stream_timeout_ms", u.stream_timeout_ms),
                ("timeout_ms", Some(u.timeout_ms)),
                ("connect_timeout_ms", Some(u.connect_timeout_ms)),
                ("first_token_timeout_ms", u.first_token_timeout_ms),
                ("idle_timeout_ms", u.idle_timeout_ms),
            ] {
                if v == Some(0) {
                    return Err(bad(at(f), &0, "timeouts must be positive"));
                }
            }
            if let Err((f, v, why)) = u.retry.check() {
                return Err(bad(at(&format!("retry.{f}")), &v, why));
            }
            if let Err((f, v, why)) = u.breaker.check() {
                return Err(bad(at(&format!("breaker.{f}")), &v, why));
            }
            if u.max_concurrency == Some(0) {
                return Err(bad(
                    at("max_concurrency"),
                    &0,
                    "must be at least 1 (or unset: no limit)",
                ));
            }
            upstreams.push(Upstream { cfg: u, price });
        }
        let find =
            |spec: &Option<toml::Value>, field: String| -> Result<Option<Group>, ConfigError> {
                let Some(spec) = spec else { return Ok(None) };
                group_of(spec, &field, &upstreams)
                    .map(Some)
                    .map_err(|(f, v, why)| bad(f, &v, &why))
            };
        let mut routes = Vec::new();
        let mut encoders = None;
        let mut route_names = BTreeSet::new();
        for (i, r) in self.routes.into_iter().enumerate() {
            let at = |f: &str| format!("route[{i}].{f}");
            if r.name.is_empty() || !route_names.insert(r.name.clone()) {
                return Err(bad(at("name"), &r.name, "must be non-empty and unique"));
            }
            let mut tiers = Vec::new();
            let (small, large) = match r.kind {
                RouteKind::Cascade if r.tiers.is_some() => {
                    if r.small.is_some() || r.large.is_some() || r.upstream.is_some() {
                        return Err(bad(
                            at("tiers"),
                            &"(set)",
                            "names every tier of the cascade; remove small, large and upstream",
                        ));
                    }
                    let specs = r.tiers.as_deref().unwrap_or_default();
                    if !(2..=MAX_TIERS).contains(&specs.len()) {
                        return Err(bad(
                            at("tiers"),
                            &specs.len(),
                            &format!("a cascade has 2 to {MAX_TIERS} tiers"),
                        ));
                    }
                    for (k, spec) in specs.iter().enumerate() {
                        let g = group_of(spec, &at(&format!("tiers[{k}]")), &upstreams)
                            .map_err(|(f, v, why)| bad(f, &v, &why))?;
                        tiers.push(g);
                    }
                    // Cheapest first: the walk starts at the first tier and the budget meters
                    // the steps up, so tiers out of order would call and budget the wrong ones.
                    let price = |g: &Group| {
                        g.members
                            .iter()
                            .filter_map(|&m| upstreams.get(m))
                            .map(|u| u.price.cost(REFERENCE_CALL))
                            .max()
                            .unwrap_or(0)
                    };
                    for k in 1..tiers.len() {
                        let (lo, hi) = (price(&tiers[k - 1]), price(&tiers[k]));
                        if hi < lo {
                            return Err(bad(
                                at(&format!("tiers[{k}]")),
                                &format!("{} (${:.6} a call of 1,000 tokens in and out, below tiers[{}]'s ${:.6})", specs[k], micros_to_usd(hi), k - 1, micros_to_usd(lo)),
                                "tiers go cheapest first: each at least the price of the one before",
                            ));
                        }
                    }
                    (tiers.first().cloned(), tiers.last().cloned())
                }
                _ if r.tiers.is_some() => {
                    return Err(bad(at("tiers"), &"(set)", "applies to cascade routes"));
                }
                RouteKind::Fixed => {
                    if r.upstream.is_none() {
                        return Err(bad(
                            at("upstream"),
                            &"(missing)",
                            "a fixed route needs its upstream",
                        ));
                    }
                    // A fixed route's upstream counts as the large model: it is the one budgeted.
                    (
                        find(&r.small, at("small"))?,
                        find(&r.upstream, at("upstream"))?,
                    )
                }
                RouteKind::RouteBefore | RouteKind::Cascade | RouteKind::Switching => {
                    if r.upstream.is_some() {
                        return Err(bad(
                            at("upstream"),
                            &"(set)",
                            "applies to fixed routes; set small and large",
                        ));
                    }
                    let s = find(&r.small, at("small"))?;
                    let l = find(&r.large, at("large"))?;
                    if s.is_none() || l.is_none() {
                        return Err(bad(
                            at("small"),
                            &"(missing)",
                            "routing needs both small and large",
                        ));
                    }
                    (s, l)
                }
            };
            if let Some(t) = r.target_share {
                if !(0.0..=1.0).contains(&t) {
                    return Err(bad(at("target_share"), &t, "must be between 0 and 1"));
                }
            }
            match r.kind {
                RouteKind::RouteBefore if r.target_share.is_none() => {
                    return Err(bad(
                        at("target_share"),
                        &"(missing)",
                        "a route_before route holds a target share of large calls",
                    ));
                }
                RouteKind::Cascade
                    if !matches!(r.gate, CascadeGate::Ocl | CascadeGate::Random)
                        && r.target_share.is_some() == r.threshold.is_some() =>
                {
                    return Err(bad(
                        at("threshold"),
                        &format!(
                            "{} (target_share = {})",
                            r.threshold.map_or("(missing)".into(), |t| t.to_string()),
                            r.target_share.map_or("(missing)".into(), |t| t.to_string())
                        ),
                        "a cascade route needs exactly one of target_share and threshold",
                    ));
                }
                RouteKind::Fixed | RouteKind::Switching
                    if r.target_share.is_some() || r.threshold.is_some() =>
                {
                    return Err(bad(
                        at("target_share"),
                        &"(set)",
                        "fixed routes make no share-held decision; switching routes learn theirs",
                    ));
                }
                _ => {}
            }
            match (&r.switching, r.kind) {
                (Some(_), k) if k != RouteKind::Switching => {
                    return Err(bad(
                        at("switching"),
                        &"(set)",
                        "applies to switching routes",
                    ));
                }
                (Some(s), _) => {
                    if let Err(e) = s.validate() {
                        return Err(bad(at("switching"), &e, "invalid controller settings"));
                    }
                }
                _ => {}
            }
            if !(0.0..=1.0).contains(&r.explore) {
                return Err(bad(at("explore"), &r.explore, "must be between 0 and 1"));
            }
            if let Some(d) = r.deadline_ms.filter(|d| !(1..=3_600_000).contains(d)) {
                return Err(bad(at("deadline_ms"), &d, "must be 1 to 3600000"));
            }
            if r.max_tokens == Some(0) {
                return Err(bad(at("max_tokens"), &0, "must be at least 1"));
            }
            if let Some(t) = r.threshold {
                if !t.is_finite() {
                    return Err(bad(at("threshold"), &t, "must be a finite number"));
                }
            }
            if !r.explore.is_finite() {
                return Err(bad(at("explore"), &r.explore, "must be between 0 and 1"));
            }
            if r.kind == RouteKind::Cascade {
                if tiers.is_empty() && matches!(r.gate, CascadeGate::Ocl | CascadeGate::Random) {
                    // The two-tier form of an engine cascade.
                    tiers = small.iter().chain(large.iter()).cloned().collect();
                }
                if !tiers.is_empty() {
                    check_engine_gate(&r).map_err(|(f, v, why)| bad(at(f), &v, &why))?;
                }
            }
            // Where the small model's log-probabilities are checked below: the two-model form
            // names them (its message is the two-model one), a list of tiers names its cheap tiers.
            let two_model = tiers.is_empty();
            // A gate that reads the small model's token log-probabilities needs an upstream that
            // gives them; asking one that does not fails every request. On an engine cascade every
            // tier below the top is read.
            let cheap: Vec<&Group> = match tiers.split_last() {
                Some((_, below)) => below.iter().collect(),
                None => small.iter().collect(),
            };
            if r.kind == RouteKind::Cascade
                && matches!(r.gate, CascadeGate::Logprob | CascadeGate::Energy)
            {
                for u in cheap
                    .iter()
                    .flat_map(|g| &g.members)
                    .filter_map(|&i| upstreams.get(i))
                {
                    if !u.cfg.gives_logprobs() {
                        return Err(bad(
                            at("gate"),
                            &format!("{:?}", r.gate).to_lowercase(),
                            &format!(
                                "reads the {} token log-probabilities, but upstream `{}` does not declare `logprobs = true`; declare it if the endpoint returns them, or use gate = \"{}\"",
                                if two_model { "small model's" } else { "cheap tiers'" },
                                u.cfg.name,
                                if two_model { "learned" } else { "ocl" }
                            ),
                        ));
                    }
                }
            }
            if (r.kind == RouteKind::Cascade && two_model) || r.kind == RouteKind::RouteBefore {
                // The two-model forms (a cascade gated on the small model's signal or on its
                // learned scorer, a route-before router) run on the engine as two tiers, with
                // the two-model gate as the policy (a share or a threshold, exploration: see
                // `route::engine_cascade`).
                tiers = small.iter().chain(large.iter()).cloned().collect();
            }
            if r.s4l && r.kind != RouteKind::Cascade {
                return Err(bad(
                    at("s4l"),
                    &true,
                    "applies to cascade routes (the small draft exists only there)",
                ));
            }
            let max_micros: Option<Micros> =
                match r.budget.max_usd {
                    None => None,
                    Some(usd) => Some(usd_to_micros(usd).filter(|&m| m > 0).ok_or_else(|| {
                        bad(at("budget.max_usd"), &usd, "must be a positive amount")
                    })?),
                };
            if r.budget.max_calls == Some(0) {
                return Err(bad(at("budget.max_calls"), &0, "must be at least 1"));
            }
            if r.budget.window_s == Some(0) {
                return Err(bad(at("budget.window_s"), &0, "must be at least 1 second"));
            }
            let embedder = match r.embeddings {
                None => None,
                Some(kind) => {
                    if r.kind != RouteKind::RouteBefore {
                        return Err(bad(
                            at("embeddings"),
                            &"minilm",
                            "applies to route_before routes",
                        ));
                    }
                    Some(
                        encoder(kind, &mut encoders)
                            .map_err(|why| bad(at("embeddings"), &"minilm", &why))?,
                    )
                }
            };
            let prior = match &r.prior {
                None => None,
                Some(p) => {
                    let file = base_dir.join(p);
                    let shown = p.display();
                    let prior = check_prior(&r, &file, embedder.as_deref())
                        .map_err(|why| bad(at("prior"), &shown, &why))?;
                    Some(std::sync::Arc::new(prior))
                }
            };
            if let Some(w) = r.cost_weight {
                if r.kind != RouteKind::RouteBefore {
                    return Err(bad(at("cost_weight"), &w, "applies to route_before routes"));
                }
                if !(0.0..=1.0).contains(&w) {
                    return Err(bad(
                        at("cost_weight"),
                        &w,
                        "must be between 0 (quality gain alone) and 1 (gain per dollar)",
                    ));
                }
            }
            let large_price = large.as_ref().and_then(|g| {
                g.members
                    .iter()
                    .filter_map(|&m| upstreams.get(m))
                    .max_by_key(|u| u.price.cost(REFERENCE_CALL))
                    .map(|u| u.price)
            });
            routes.push(Route {
                large_price,
                prior,
                embedder,
                limits: BudgetLimits {
                    max_calls: r.budget.max_calls,
                    max_micros,
                },
                small,
                large,
                tiers,
                cfg: r,
            });
        }
        if routes.is_empty() {
            return Err(bad(
                "route".into(),
                &"(none)",
                "define at least one [[route]]",
            ));
        }
        Ok(Validated {
            server: self.server,
            upstreams,
            routes,
            base_dir,
        })
    }
}

/// Reads a role's upstream (`"name"`) or group (`["a", "b"]`, or `[{ upstream = "a", weight
/// = 3 }, ...]`) against the upstreams defined; an error is (field, value, why).
fn group_of(
    spec: &toml::Value,
    field: &str,
    ups: &[Upstream],
) -> Result<Group, (String, String, String)> {
    let index = |name: &str, f: String| -> Result<usize, (String, String, String)> {
        ups.iter()
            .position(|u| u.cfg.name == name)
            .ok_or_else(|| (f, name.to_string(), "names no [[upstream]]".into()))
    };
    let items =
        match spec {
            toml::Value::String(name) => return Ok(Group::one(index(name, field.to_string())?)),
            toml::Value::Array(items) => items,
            other => return Err((
                field.to_string(),
                other.to_string(),
                "must be an upstream's name, or a list of names or of { upstream, weight } tables"
                    .into(),
            )),
        };
    if items.is_empty() {
        return Err((
            field.to_string(),
            "[]".into(),
            "a group needs at least one upstream".into(),
        ));
    }
    let mut members = Vec::with_capacity(items.len());
    let mut weights = Vec::with_capacity(items.len());
    let mut weighted = false;
    for (j, it) in items.iter().enumerate() {
        let at = |k: &str| format!("{field}[{j}]{k}");
        let (i, w) = match it {
            toml::Value::String(name) => (index(name, at(""))?, 1),
            toml::Value::Table(t) => {
                if let Some(k) = t
                    .keys()
                    .find(|k| !matches!(k.as_str(), "upstream" | "weight"))
                {
                    return Err((
                        at(&format!(".{k}")),
                        t[k].to_string(),
                        "unknown field: a member has `upstream` and `weight`".into(),
                    ));
                }
                let name = match t.get("upstream") {
                    Some(toml::Value::String(n)) => n,
                    Some(v) => {
                        return Err((
                            at(".upstream"),
                            v.to_string(),
                            "must be an upstream's name".into(),
                        ))
                    }
                    None => {
                        return Err((
                            at(".upstream"),
                            "(missing)".into(),
                            "a member names its upstream".into(),
                        ))
                    }
                };
                let w = match t.get("weight") {
                    None => 1,
                    Some(toml::Value::Integer(w)) if (1..=1_000_000).contains(w) => {
                        weighted = true;
                        *w as u32
                    }
                    Some(v) => {
                        return Err((
                            at(".weight"),
                            v.to_string(),
                            "must be a whole number from 1 to 1000000".into(),
                        ))
                    }
                };
                (index(name, at(".upstream"))?, w)
            }
            other => {
                return Err((
                    at(""),
                    other.to_string(),
                    "must be an upstream's name or a { upstream, weight } table".into(),
                ))
            }
        };
        if members.contains(&i) {
            return Err((
                at(""),
                ups[i].cfg.name.clone(),
                "is in the group twice".into(),
            ));
        }
        members.push(i);
        weights.push(w);
    }
    Ok(Group {
        members,
        weights: weighted.then_some(weights),
    })
}

impl Validated {
    /// Checks what the config names in the environment: every `api_key_env` (upstreams) and
    /// `server.api_keys_env` (clients) is set and not empty. Run by `--check` and before start.
    pub fn check_environment(&self, path: &Path) -> Result<(), ConfigError> {
        // State and spend files go in `state_dir`: a file there would close every route at start.
        if let Some(d) = self.state_dir() {
            if d.exists() && !d.is_dir() {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    field: "server.state_dir".into(),
                    value: d.display().to_string(),
                    reason: "is a file, not a directory".into(),
                });
            }
        }
        let mut vars: Vec<(String, &str)> = self
            .upstreams
            .iter()
            .enumerate()
            .filter_map(|(i, u)| {
                u.cfg
                    .api_key_env
                    .as_deref()
                    .map(|v| (format!("upstream[{i}].api_key_env"), v))
            })
            .collect();
        if let Some(v) = self.server.api_keys_env.as_deref() {
            vars.push(("server.api_keys_env".into(), v));
        }
        if let Some(v) = self
            .server
            .shared
            .as_ref()
            .and_then(|s| s.redis_url_env.as_deref())
        {
            if let Ok(u) = std::env::var(v) {
                if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                    return Err(ConfigError::Invalid {
                        path: path.to_path_buf(),
                        field: "server.shared.redis_url_env".into(),
                        value: v.to_string(),
                        reason: "the variable must hold a redis:// or rediss:// URL (its value is not shown: it may hold a password)".into(),
                    });
                }
            }
            vars.push(("server.shared.redis_url_env".into(), v));
        }
        for (field, var) in vars {
            let set = std::env::var(var).is_ok_and(|k| k.split(',').any(|k| !k.trim().is_empty()));
            if !set {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    field,
                    value: var.to_string(),
                    reason: "names an environment variable that is not set (or holds no key)"
                        .into(),
                });
            }
        }
        Ok(())
    }

    pub fn state_dir(&self) -> Option<PathBuf> {
        self.server.state_dir.as_ref().map(|d| {
            if d.is_absolute() {
                d.clone()
            } else {
                self.base_dir.join(d)
            }
        })
    }
}

/// Loads a route's prior and checks it can start the route's learned model: the right kind of
/// model, trained with the gateway's feature settings (its state files are read with them).
fn check_prior(
    r: &RouteConfig,
    file: &Path,
    embedder: Option<&dyn tandem_core::embed::Embedder>,
) -> Result<tandem_core::prior::Prior, String> {
    let two_model_learned =
        r.kind == RouteKind::Cascade && r.gate == CascadeGate::Learned && r.tiers.is_none();
    if r.kind != RouteKind::RouteBefore && !two_model_learned {
        return Err(
            "applies to route_before routes and to cascades of small/large with gate = \"learned\""
                .into(),
        );
    }
    let prior = tandem_core::prior::Prior::load(file).map_err(|e| e.to_string())?;
    // What differs between the prior's model and the route's, in `tandem train`'s terms; None
    // when the prior has no such model.
    let (differences, what) = if r.kind == RouteKind::RouteBefore {
        (
            prior.router.as_ref().map(|m| {
                tandem_core::prior::router_differences(
                    &m.config(),
                    &crate::route::router_config(embedder),
                )
            }),
            "router",
        )
    } else {
        (
            prior.cascade.as_ref().map(|m| {
                tandem_core::prior::cascade_differences(
                    &m.config(),
                    &crate::route::cascade_config(),
                )
            }),
            "cascade scorer (train it on files that record the weak model's responses)",
        )
    };
    let vectors = |c: &tandem_core::policy::router::RouterConfig| c.reads_embeddings();
    if let (Some(m), true) = (prior.router.as_ref(), r.kind == RouteKind::RouteBefore) {
        match (vectors(&m.config()), embedder) {
            (true, None) => {
                return Err(format!(
                    "{}: its router reads sentence vectors ({}): add embeddings = \"minilm\" to the route, or train the prior without --embed",
                    file.display(),
                    prior.info.embedder.as_deref().unwrap_or("an encoder")
                ))
            }
            (false, Some(_)) => {
                return Err(format!(
                    "{}: its router was trained without sentence vectors and this route reads them: train it with `tandem train --embed`, or drop `embeddings`",
                    file.display()
                ))
            }
            _ => {}
        }
    }
    if let (Some(m), false) = (prior.cascade.as_ref(), r.kind == RouteKind::RouteBefore) {
        if m.config().reads_embeddings() {
            return Err(format!(
                "{}: its cascade scorer reads sentence vectors (trained with --embed), which a gateway cascade does not read: train the prior without --embed",
                file.display()
            ));
        }
    }
    match differences {
        None => Err(format!("{} holds no {what}", file.display())),
        Some(d) if !d.is_empty() => Err(format!(
            "{}: its {what} does not match the gateway's: {}",
            file.display(),
            d.join("; ")
        )),
        Some(_) => match (prior.info.embedder.as_deref(), embedder.map(|e| e.name())) {
            (Some(a), Some(b)) if a != b => Err(format!(
                "{}: its router read {a}'s vectors, this route reads {b}'s",
                file.display()
            )),
            _ => Ok(prior),
        },
    }
}

/// The route's encoder, loaded once per configuration whatever the number of routes using it.
fn encoder(
    kind: EmbeddingsKind,
    loaded: &mut Option<std::sync::Arc<dyn tandem_core::embed::Embedder>>,
) -> Result<std::sync::Arc<dyn tandem_core::embed::Embedder>, String> {
    match kind {
        EmbeddingsKind::Minilm => {
            if let Some(e) = loaded {
                return Ok(e.clone());
            }
            let store = tandem_models::assets::Store::default_home();
            let e = tandem_models::embedder::MiniLmEmbedder::load(&store, EMBEDDING_CACHE)
                .map_err(|e| e.to_string())?;
            let e: std::sync::Arc<dyn tandem_core::embed::Embedder> = std::sync::Arc::new(e);
            *loaded = Some(e.clone());
            Ok(e)
        }
    }
}

/// Prompts whose vectors a gateway keeps.
const EMBEDDING_CACHE: usize = 100_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Validated, ConfigError> {
        let cfg: ServerConfig = toml::from_str(s).map_err(|e| ConfigError::Parse {
            path: "t.toml".into(),
            message: e.to_string(),
        })?;
        cfg.validate(Path::new("t.toml"), PathBuf::new())
    }

    const UPS: &str = r#"
[[upstream]]
name = "s"
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
model = "m"
logprobs = true
[[upstream]]
name = "l"
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
model = "m"
price = "token:10:30"
"#;

    #[test]
    fn check_environment_names_unset_key_variables() {
        let ups = UPS.replace(
            "price = \"token:10:30\"\n",
            "price = \"token:10:30\"\napi_key_env = \"TANDEM_TEST_UNSET_VAR_1\"\n",
        );
        let v = parse(&format!(
            "{ups}[[route]]\nname = \"f\"\nkind = \"fixed\"\nupstream = \"l\"\n"
        ))
        .unwrap();
        let e = v
            .check_environment(Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("upstream[1].api_key_env = TANDEM_TEST_UNSET_VAR_1"),
            "{e}"
        );
        std::env::set_var("TANDEM_TEST_UNSET_VAR_1", " , ");
        assert!(
            v.check_environment(Path::new("t.toml")).is_err(),
            "no key in it"
        );
        std::env::set_var("TANDEM_TEST_UNSET_VAR_1", "sk-x");
        assert!(v.check_environment(Path::new("t.toml")).is_ok());
    }

    #[test]
    fn shared_settings_are_checked_before_anything_connects() {
        let route = "[[route]]\nname = \"f\"\nkind = \"fixed\"\nupstream = \"l\"\n";
        let ok = parse(&format!(
            "[server.shared]\nredis_url = \"redis://127.0.0.1:6379/0\"\nprefix = \"prod-1\"\non_redis_down = {{ mode = \"fail_open\", share = 0.5 }}\n{UPS}{route}"
        ))
        .unwrap();
        let sh = ok.server.shared.unwrap();
        assert_eq!(sh.prefix, "prod-1");
        assert_eq!(sh.hold_s, 900);
        let cases = [
            ("", "server.shared.redis_url = (missing)"),
            ("redis_url = \"http://h:6379\"\n", "server.shared.redis_url = http://h:6379"),
            (
                "redis_url = \"redis://:pw@127.0.0.1:notaport/0\"\n",
                "server.shared.redis_url = redis://:***@127.0.0.1:notaport/0",
            ),
            (
                "redis_url = \"tcp://:pw@h\"\n",
                "must start with redis://",
            ),
            (
                "redis_url = \"redis://h\"\nredis_url_env = \"X\"\n",
                "server.shared.redis_url_env = X",
            ),
            ("redis_url = \"redis://h\"\nprefix = \"a:b\"\n", "server.shared.prefix = a:b"),
            ("redis_url = \"redis://h\"\nprefix = \"\"\n", "server.shared.prefix"),
            (
                "redis_url = \"redis://h\"\non_redis_down = { mode = \"fail_open\", share = 0.0 }\n",
                "server.shared.on_redis_down",
            ),
            (
                "redis_url = \"redis://h\"\non_redis_down = { mode = \"fail_open\", share = nan }\n",
                "server.shared.on_redis_down",
            ),
            (
                "redis_url = \"redis://h\"\non_redis_down = { mode = \"fail_open\", share = 1.5 }\n",
                "server.shared.on_redis_down",
            ),
            ("redis_url = \"redis://h\"\nop_timeout_ms = 0\n", "server.shared.op_timeout_ms = 0"),
            ("redis_url = \"redis://h\"\nhold_s = 1\n", "server.shared.hold_s = 1"),
            (
                "redis_url = \"redis://h\"\nfeedback_ttl_s = 0\n",
                "server.shared.feedback_ttl_s = 0",
            ),
            (
                "redis_url = \"redis://h\"\nreplica_id = \"a b\"\n",
                "server.shared.replica_id = a b",
            ),
        ];
        for (section, want) in cases {
            let e = parse(&format!("[server.shared]\n{section}{UPS}{route}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{section:?}: {e}");
        }
        // The password never shows in an error.
        let e = parse(&format!(
            "[server.shared]\nredis_url = \"tcp://user:s3cret@h\"\n{UPS}{route}"
        ))
        .unwrap_err()
        .to_string();
        assert!(!e.contains("s3cret"), "{e}");
        // Unknown fields and modes are refused by name.
        for bad in [
            "redis_uri = \"redis://h\"\n",
            "redis_url = \"redis://h\"\non_redis_down = { mode = \"fail_sometimes\" }\n",
        ] {
            let e = parse(&format!("[server.shared]\n{bad}{UPS}{route}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("unknown"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_good_config_validates() {
        let v = parse(&format!(
            "{UPS}[[route]]\nname = \"tandem\"\nkind = \"cascade\"\nsmall = \"s\"\nlarge = \"l\"\ntarget_share = 0.3\n[route.budget]\nmax_usd = 1.5\n"
        ))
        .unwrap();
        assert_eq!(v.routes[0].small, Some(Group::one(0)));
        assert_eq!(v.routes[0].large, Some(Group::one(1)));
        assert_eq!(v.routes[0].limits.max_micros, Some(1_500_000));
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let cases = [
            ("[[route]]\nname = \"x\"\nkind = \"cascade\"\nsmall = \"s\"\nlarge = \"nope\"\ntarget_share = 0.3\n", "route[0].large = nope"),
            ("[[route]]\nname = \"x\"\nkind = \"cascade\"\nsmall = \"s\"\nlarge = \"l\"\n", "route[0].threshold"),
            ("[[route]]\nname = \"x\"\nkind = \"route_before\"\nsmall = \"s\"\nlarge = \"l\"\ntarget_share = 1.5\n", "route[0].target_share = 1.5"),
            ("[[route]]\nname = \"x\"\nkind = \"fixed\"\nupstream = \"l\"\n[route.budget]\nmax_usd = -1\n", "route[0].budget.max_usd = -1"),
            ("[[route]]\nname = \"x\"\nkind = \"fixed\"\nupstream = \"l\"\ncolour = 1\n", "unknown field `colour`"),
        ];
        for (route, want) in cases {
            let e = parse(&format!("{UPS}{route}")).err().unwrap().to_string();
            assert!(e.contains(want), "{e} should contain {want}");
        }
        // A logprob or energy gate on a small upstream that does not declare log-probabilities.
        let no_lp = UPS.replace("logprobs = true\n", "");
        for gate in ["logprob", "energy"] {
            let e = parse(&format!(
                "{no_lp}[[route]]\nname = \"x\"\nkind = \"cascade\"\nsmall = \"s\"\nlarge = \"l\"\ngate = \"{gate}\"\nthreshold = 1.0\n"
            ))
            .err()
            .unwrap()
            .to_string();
            assert!(
                e.contains("route[0].gate") && e.contains("`s` does not declare `logprobs = true`"),
                "{e}"
            );
        }
        assert!(parse(&format!(
            "{no_lp}[[route]]\nname = \"x\"\nkind = \"cascade\"\nsmall = \"s\"\nlarge = \"l\"\ngate = \"learned\"\nthreshold = 1.0\n"
        ))
        .is_ok());
        // Numbers that are not numbers.
        for (field, v) in [
            ("threshold", "nan"),
            ("threshold", "inf"),
            ("threshold", "-inf"),
            ("explore", "nan"),
            ("budget.max_usd", "nan"),
            ("budget.max_usd", "inf"),
        ] {
            let line = match field.strip_prefix("budget.") {
                Some(f) => format!("threshold = 1.0\n[route.budget]\n{f} = {v}\n"),
                None if field == "threshold" => format!("{field} = {v}\n"),
                None => format!("threshold = 1.0\n{field} = {v}\n"),
            };
            let e = parse(&format!(
                "{UPS}[[route]]\nname = \"x\"\nkind = \"cascade\"\nsmall = \"s\"\nlarge = \"l\"\n{line}"
            ))
            .err()
            .unwrap()
            .to_string();
            assert!(e.contains(&format!("route[0].{field}")), "{e}");
        }
        for price in ["token:nan", "call:inf", "token:1:-inf"] {
            let e = parse(&format!(
                "{}[[route]]\nname = \"x\"\nkind = \"fixed\"\nupstream = \"l\"\n",
                UPS.replace("token:10:30", price)
            ))
            .err()
            .unwrap()
            .to_string();
            assert!(e.contains(&format!("upstream[1].price = {price}")), "{e}");
        }
        let e = parse("[[upstream]]\nname = \"s\"\nkind = \"openai\"\nbase_url = \"ftp://x\"\nmodel = \"m\"\n[[route]]\nname = \"x\"\nkind = \"fixed\"\nupstream = \"s\"\n").err().unwrap().to_string();
        assert!(e.contains("upstream[0].base_url = ftp://x"), "{e}");
    }

    fn with_cors(cors: &str) -> Result<Validated, ConfigError> {
        parse(&format!(
            "[server.cors]\n{cors}\n{UPS}[[route]]\nname = \"x\"\nkind = \"fixed\"\nupstream = \"l\"\n"
        ))
    }

    #[test]
    fn cors_origins_are_checked_and_normalised() {
        let v = with_cors(
            "allow_origins = [\"https://App.Example\", \"http://localhost:5173\", \"https://a.example:443\", \"http://[::1]:80\"]\nmax_age_s = 600",
        )
        .unwrap();
        let cors = v.server.cors.unwrap();
        assert_eq!(
            cors.allow_origins,
            [
                "https://app.example",
                "http://localhost:5173",
                "https://a.example",
                "http://[::1]"
            ]
        );
        assert_eq!(cors.max_age_s, Some(600));
        let any = with_cors("allow_origins = [\"*\"]").unwrap();
        assert_eq!(any.server.cors.unwrap().allow_origins, ["*"]);
        assert!(with_cors("allow_origins = []\n")
            .err()
            .unwrap()
            .to_string()
            .contains("server.cors.allow_origins = []"));
        for bad in [
            "https://app.example/",
            "https://app.example/path",
            "https://app.example?q=1",
            "https://app.example#top",
            "ftp://app.example",
            "app.example",
            "https://user@app.example",
            "https://",
            "https://app example",
            "null",
        ] {
            let e = with_cors(&format!("allow_origins = [\"{bad}\"]"))
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains(&format!("server.cors.allow_origins = {bad}:")),
                "{bad}: {e}"
            );
        }
        let e = with_cors("allow_origins = [\"*\", \"https://a.example\"]")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("server.cors.allow_origins = *: "), "{e}");
        let e = with_cors("allow_origins = [\"*\"]\nallow_methods = [\"GET\"]")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown field `allow_methods`"), "{e}");
        assert!(parse(&format!(
            "{UPS}[[route]]\nname = \"x\"\nkind = \"fixed\"\nupstream = \"l\"\n"
        ))
        .unwrap()
        .server
        .cors
        .is_none());
    }
}
