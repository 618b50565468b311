//! A streamed answer on its way to the client: the pieces from the upstream, and the accounting
//! that can only happen at the end (the budget trued up from `usage`, counters, the feedback record,
//! learning from an escalated cascade). A stream the client abandons keeps its reservation
//! charged in full: what the upstream billed is unknown, and the budget must not be passed.

use super::run::{Done, Streaming};
use super::{Ctx, Gateway};
use crate::error::GatewayError;
use crate::feedback::Served;
use crate::openai::{TandemInfo, WireUsage};
use crate::upstream::{Completion, Pieces};
use std::sync::Arc;
use std::time::Instant;
use tandem_core::Usage;

pub struct StreamReply {
    pub id: String,
    pub created: u64,
    pub model: String,
    /// What is known when the first byte goes out (cost so far; the final one comes at the end).
    pub head: TandemInfo,
    pub pieces: Pieces,
    finish: Finisher,
}

struct Finisher {
    gw: Arc<Gateway>,
    ctx: Ctx,
    s: StreamingRest,
    input_bound: u64,
    started: Instant,
}

/// [`Streaming`] without its receiver.
struct StreamingRest {
    held: Option<crate::budget::Held>,
    served: Served,
    draft: Option<Completion>,
    score: Option<f32>,
    capped: bool,
    cost: tandem_core::Micros,
}

impl StreamReply {
    pub(super) fn new(gw: Arc<Gateway>, ctx: Ctx, s: Streaming, input_bound: u64) -> StreamReply {
        let route = &gw.routes[ctx.route];
        let up = match s.served {
            Served::Large => route.cfg.large,
            Served::Small => route.cfg.small,
        };
        let tier = gw.upstream(up).map(|u| u.name.clone()).unwrap_or_default();
        let head = TandemInfo {
            route: route.name().to_string(),
            tier,
            role: match s.served {
                Served::Large => "large",
                Served::Small => "small",
            }
            .into(),
            escalated: s.draft.is_some() && s.served == Served::Large,
            score: s.score,
            cost_usd: tandem_core::money::micros_to_usd(s.cost),
            capped: s.capped,
        };
        StreamReply {
            id: ctx.id.clone(),
            created: ctx.created,
            model: route.name().to_string(),
            head,
            pieces: s.pieces,
            finish: Finisher {
                gw: gw.clone(),
                ctx,
                s: StreamingRest {
                    held: s.held,
                    served: s.served,
                    draft: s.draft,
                    score: s.score,
                    capped: s.capped,
                    cost: s.cost,
                },
                input_bound,
                started: Instant::now(),
            },
        }
    }

    /// Splits the reply into its pieces and the accounting to run at their end.
    pub fn into_parts(self) -> (Pieces, StreamEnd) {
        (self.pieces, StreamEnd(Some(self.finish)))
    }
}

/// Completes a stream's accounting once, with the full text and the upstream's final event.
pub struct StreamEnd(Option<Finisher>);

impl StreamEnd {
    pub fn finish(
        &mut self,
        text: String,
        finish_reason: String,
        usage: Option<Usage>,
    ) -> Result<(TandemInfo, WireUsage), GatewayError> {
        let Some(f) = self.0.take() else {
            return Err(GatewayError::Internal("a stream finished twice".into()));
        };
        f.finish(text, finish_reason, usage)
    }
}

impl Finisher {
    fn finish(
        self,
        text: String,
        finish_reason: String,
        usage: Option<Usage>,
    ) -> Result<(TandemInfo, WireUsage), GatewayError> {
        let gw = &self.gw;
        let route = &gw.routes[self.ctx.route];
        let s = self.s;
        let up = gw.upstream(match s.served {
            Served::Large => route.cfg.large,
            Served::Small => route.cfg.small,
        })?;
        // Without the upstream's count, bound it: a token is at least a byte.
        let usage = usage.unwrap_or(Usage {
            input_tokens: self.input_bound,
            output_tokens: text.len() as u64,
        });
        let cost = up.cost(usage);
        if let Some(h) = s.held {
            h.settle(cost);
        }
        let answer = Completion {
            text,
            finish_reason,
            usage,
            token_logprobs: None,
            token_energies: None,
            elapsed: self.started.elapsed(),
        };
        if let (Served::Large, Some(d)) = (s.served, &s.draft) {
            super::run::Run::new(gw, route).teach(
                &self.ctx.query,
                d,
                &answer,
                self.ctx.learn,
                true,
            );
        }
        let (small, large) = match s.served {
            Served::Large => (s.draft, Some(answer)),
            Served::Small => (Some(answer), None),
        };
        let done = Done {
            small,
            large,
            served: s.served,
            score: s.score,
            capped: s.capped,
            cost: s.cost + cost,
        };
        let c = gw.record(&self.ctx, done)?;
        Ok((c.tandem, c.usage))
    }
}
