//! A streamed answer on its way to the client: each upstream chunk passes whole (tandem's id and
//! the route as `model`, log-probabilities as asked), while an [`Assembler`] rebuilds the answer for
//! the accounting that can only happen at the end (the budget trued up from `usage` — or an
//! estimate when the stream ends without one — counters, the feedback record, learning from an
//! escalated cascade). The usage chunk is tandem's, sent only to clients that asked for it. A
//! stream the client abandons, or the upstream cuts, keeps its reservation charged in full: what
//! the upstream billed is unknown, and the budget must not be passed.

use super::run::{Done, Streaming};
use super::{Ctx, Gateway};
use crate::chunks::{chunks_of, for_client, Assembler};
use crate::error::GatewayError;
use crate::feedback::Served;
use crate::openai::TandemInfo;
use crate::upstream::{logprob_signals, Call, Completion, Draft, Piece, Pieces};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;
use tandem_core::Usage;

/// One step of a stream for the HTTP layer.
// The end comes once per stream and is moved straight out: boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    /// SSE bytes to send on.
    Data(String),
    /// The last bytes; the final accounting (or the error that ended the stream, and what the
    /// request was charged: its reservation, kept whole).
    End {
        data: String,
        info: Option<TandemInfo>,
        error: Option<GatewayError>,
        charged_usd: f64,
    },
}

pub struct StreamReply {
    pub id: String,
    pub created: u64,
    pub model: String,
    /// What is known when the first byte goes out (cost so far; the final one comes at the end).
    pub head: TandemInfo,
    pieces: Pieces,
    finish: Option<Finisher>,
    asm: Assembler,
    asked_logprobs: Option<u32>,
    include_usage: bool,
    over: bool,
}

struct Finisher {
    gw: Arc<Gateway>,
    ctx: Ctx,
    held: Option<crate::budget::Held>,
    served: Served,
    draft: Option<Completion>,
    score: Option<f32>,
    capped: bool,
    cost: tandem_core::Micros,
    tried: u32,
    call: Call,
    /// The upstream streaming.
    by: usize,
    tiers: Option<super::run::TierOutcome>,
    /// An engine cascade's walk, finished when the stream ends.
    walk: Option<Box<tandem_core::engine::Walk>>,
    started: Instant,
}

fn event(v: &impl serde::Serialize) -> String {
    format!(
        "data: {}\n\n",
        serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
    )
}

const DONE: &str = "data: [DONE]\n\n";

/// The usage chunk: tandem's, with the final cost in its `tandem` field, and the stream's own
/// `created` and other fields (`system_fingerprint`, ...) like its other chunks.
fn usage_chunk(
    asm: &Assembler,
    id: &str,
    created: u64,
    model: &str,
    usage: &Value,
    t: &TandemInfo,
) -> String {
    let mut c = asm.top().clone();
    c.insert("id".into(), json!(id));
    c.insert("object".into(), json!("chat.completion.chunk"));
    c.insert(
        "created".into(),
        asm.created.clone().unwrap_or(json!(created)),
    );
    c.insert("model".into(), json!(model));
    c.insert("choices".into(), json!([]));
    c.insert("usage".into(), usage.clone());
    c.insert(
        "tandem".into(),
        serde_json::to_value(t).unwrap_or(Value::Null),
    );
    event(&c)
}

/// A whole answer (as the client gets it: `id`, `model`, `usage` and `tandem` already set) as
/// OpenAI's stream of chunks: every choice's message whole in deltas, its finish reason, the usage
/// chunk when asked for, then `[DONE]`. A cascade's answer is judged in full before the first
/// byte, so its client sees one clean stream whichever model answered.
pub fn sse_whole(body: &Map<String, Value>, include_usage: bool) -> String {
    let id = body.get("id").and_then(Value::as_str).unwrap_or("");
    let model = body.get("model").and_then(Value::as_str).unwrap_or("");
    let created = body.get("created").and_then(Value::as_u64).unwrap_or(0);
    let mut plain = body.clone();
    let tandem = plain.remove("tandem").unwrap_or(Value::Null);
    let usage = plain.remove("usage").unwrap_or(Value::Null);
    let mut out = String::new();
    for mut c in chunks_of(&plain) {
        c.insert("id".into(), json!(id));
        c.entry("created").or_insert(json!(created));
        c.insert("model".into(), json!(model));
        out.push_str(&event(&c));
    }
    if include_usage {
        let mut c: Map<String, Value> = plain
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "choices" | "object"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        c.insert("id".into(), json!(id));
        c.insert("object".into(), json!("chat.completion.chunk"));
        c.insert("created".into(), json!(created));
        c.insert("model".into(), json!(model));
        c.insert("choices".into(), json!([]));
        c.insert("usage".into(), usage);
        c.insert("tandem".into(), tandem);
        out.push_str(&event(&c));
    }
    out.push_str(DONE);
    out
}

impl StreamReply {
    pub(super) fn new(gw: Arc<Gateway>, ctx: Ctx, s: Streaming) -> StreamReply {
        let route = &gw.routes[ctx.route];
        let tier = gw
            .upstream(Some(s.by))
            .map(|u| u.name.clone())
            .unwrap_or_default();
        let head = TandemInfo {
            route: route.name().to_string(),
            tier,
            role: match (s.tiers, s.served) {
                (Some(t), _) => t.role(),
                (None, Served::Large) => "large",
                (None, Served::Small) => "small",
            }
            .into(),
            escalated: s
                .tiers
                .map_or(s.draft.is_some() && s.served == Served::Large, |t| {
                    t.called > 1
                }),
            score: s.score,
            cost_usd: tandem_core::money::micros_to_usd(s.cost),
            capped: s.capped,
            usage_estimated: false,
            tried: s.tried,
            tier_index: s.tiers.map(|t| t.answered),
            tiers_called: s.tiers.map(|t| t.called),
        };
        StreamReply {
            id: ctx.id.clone(),
            created: ctx.created,
            model: route.name().to_string(),
            head,
            pieces: s.pieces,
            asm: Assembler::default(),
            asked_logprobs: ctx.asked_logprobs,
            include_usage: ctx.include_usage,
            over: false,
            finish: Some(Finisher {
                gw: gw.clone(),
                ctx,
                held: s.held,
                served: s.served,
                draft: s.draft,
                score: s.score,
                capped: s.capped,
                cost: s.cost,
                tried: s.tried,
                call: s.call,
                by: s.by,
                tiers: s.tiers,
                walk: s.walk,
                started: Instant::now(),
            }),
        }
    }

    fn fail(&mut self, e: GatewayError) -> Event {
        self.over = true;
        let charged = self.finish.take().map_or(0, Finisher::abandon);
        Event::End {
            data: event(&e.body()),
            info: None,
            error: Some(e),
            charged_usd: tandem_core::money::micros_to_usd(charged),
        }
    }

    /// The next thing to send, or None once the stream is over.
    pub async fn next(&mut self) -> Option<Event> {
        if self.over {
            return None;
        }
        loop {
            match self.pieces.recv().await {
                Some(Ok(Piece::Chunk(mut c))) => {
                    self.asm.feed(&c);
                    // Usage is tandem's to report, once, at the end (and only when asked).
                    c.remove("usage");
                    let empty = c
                        .get("choices")
                        .and_then(Value::as_array)
                        .is_some_and(Vec::is_empty);
                    if empty {
                        continue;
                    }
                    for_client(
                        &mut c,
                        &self.id,
                        self.created,
                        &self.model,
                        self.asked_logprobs,
                    );
                    return Some(Event::Data(event(&c)));
                }
                Some(Ok(Piece::Done { usage })) => {
                    self.over = true;
                    let Some(f) = self.finish.take() else {
                        return Some(
                            self.fail(GatewayError::Internal("a stream finished twice".into())),
                        );
                    };
                    let mut body = self.asm.body();
                    if let Some(u) = &self.asm.usage {
                        body.insert("usage".into(), u.clone());
                    }
                    return Some(match f.finish(body, usage) {
                        Ok((info, usage)) => {
                            let mut data = String::new();
                            if self.include_usage {
                                data.push_str(&usage_chunk(
                                    &self.asm,
                                    &self.id,
                                    self.created,
                                    &self.model,
                                    &usage,
                                    &info,
                                ));
                            }
                            data.push_str(DONE);
                            Event::End {
                                data,
                                charged_usd: info.cost_usd,
                                info: Some(info),
                                error: None,
                            }
                        }
                        Err(e) => self.fail(e),
                    });
                }
                Some(Err(e)) => return Some(self.fail(e)),
                None => {
                    return Some(
                        self.fail(GatewayError::Internal("the upstream stream stopped".into())),
                    )
                }
            }
        }
    }
}

impl Drop for StreamReply {
    /// A stream dropped before its end (the client went away) is charged like a failed one.
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            f.abandon();
        }
    }
}

impl Finisher {
    /// A stream that will not finish (the upstream failed mid-way, or the client left): its
    /// reservation is kept whole, and the spend shows in the metrics. Returns what the request
    /// was charged, in micro-dollars.
    fn abandon(mut self) -> tandem_core::Micros {
        if let Some(w) = self.walk.take() {
            let route = &self.gw.routes[self.ctx.route];
            let _ = super::run::Run::finish_streamed(route, &self.ctx, w, None, None);
        }
        // Kept at the bound of the upstream that streamed, not the group's most expensive one
        // (which the reservation was sized for).
        let bound = self
            .gw
            .upstreams
            .get(self.by)
            .map(|u| u.estimate(&self.call));
        let kept = self.held.map_or(0, |h| {
            let keep = bound.map_or(h.estimate(), |b| b.min(h.estimate()));
            h.settle(keep);
            keep
        });
        let total = self.cost + kept;
        let route = self.gw.routes[self.ctx.route].name().to_string();
        metrics::counter!("tandem_spend_micros_total", "route" => route.clone()).increment(total);
        metrics::counter!("tandem_streams_unfinished_total", "route" => route).increment(1);
        total
    }

    fn finish(
        self,
        mut body: Map<String, Value>,
        usage: Option<Usage>,
    ) -> Result<(TandemInfo, Value), GatewayError> {
        let gw = &self.gw;
        let route = &gw.routes[self.ctx.route];
        let up = gw.upstream(Some(self.by))?;
        let draft = Draft::of(&body);
        // Without the upstream's count, an upper bound: never $0.
        let (usage, usage_estimated) = match usage {
            Some(u) => (u, false),
            None => (up.usage_estimate(&self.call, &draft), true),
        };
        if usage_estimated {
            body.insert("usage".into(), crate::upstream::usage_json(usage));
        }
        let cost = up.cost(usage);
        if let Some(h) = self.held {
            h.settle(cost);
        }
        let (token_logprobs, token_energies) = body
            .get("choices")
            .and_then(|c| c.get(0))
            .map(|c| logprob_signals(&c["logprobs"]).unwrap_or((None, None)))
            .unwrap_or((None, None));
        let answer = Completion {
            body,
            draft,
            usage,
            usage_estimated,
            token_logprobs,
            token_energies,
            elapsed: self.started.elapsed(),
            by: self.by,
        };
        let walk = self.walk.and_then(|w| {
            let (text, lp) = (answer.text(), answer.token_logprobs.clone());
            super::run::Run::finish_streamed(route, &self.ctx, w, Some(text), lp)
        });
        gw.forward_learned(route);
        let (small, large) = match self.served {
            Served::Large => (self.draft, Some(answer)),
            Served::Small => (Some(answer), None),
        };
        let done = Done {
            small,
            large,
            served: self.served,
            score: self.score,
            capped: self.capped,
            cost: self.cost + cost,
            tried: self.tried,
            tiers: self.tiers,
            walk,
        };
        let (client, info) = gw.record(&self.ctx, done)?;
        Ok((info, client.get("usage").cloned().unwrap_or(Value::Null)))
    }
}
