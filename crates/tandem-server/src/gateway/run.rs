//! One request's decision and calls. First a [`Plan`]: which model serves (and, for a cascade,
//! the small model's draft and its score), with the large call's budget already reserved; then the
//! plan is carried out whole, or streamed when the client asked and the answer need not be judged.

use super::{mean, to_answer, with_hint, Gateway};
use crate::budget::Held;
use crate::config::{CascadeGate, OnExhausted};
use crate::error::GatewayError;
use crate::feedback::Served;
use crate::route::{LearnEvent, Learned, RouteState};
use crate::upstream::{Call, Completion, Pieces, Upstream};
use tandem_core::policy::gate::Route as Pick;
use tandem_core::policy::response::agreement;
use tandem_core::policy::Observation;
use tandem_core::{Micros, Query};

pub(super) enum Target {
    Small,
    Large(Held),
    /// Exploration: both models, the large answer served, the small one graded by it.
    Both(Held),
}

pub(super) struct Plan {
    pub target: Target,
    /// A cascade's small answer, already paid for.
    pub draft: Option<Completion>,
    pub score: Option<f32>,
    pub capped: bool,
}

/// A finished request: what each model answered and which one was served.
pub(super) struct Done {
    pub small: Option<Completion>,
    pub large: Option<Completion>,
    pub served: Served,
    pub score: Option<f32>,
    pub capped: bool,
    pub cost: Micros,
}

/// A request whose served answer is still streaming.
pub(super) struct Streaming {
    pub pieces: Pieces,
    /// The large call's reservation, settled when the stream ends.
    pub held: Option<Held>,
    pub served: Served,
    pub draft: Option<Completion>,
    pub score: Option<f32>,
    pub capped: bool,
    /// Spent before the streamed call (the draft).
    pub cost: Micros,
}

pub(super) struct Run<'a> {
    pub gw: &'a Gateway,
    pub route: &'a RouteState,
    pub cost: Micros,
}

impl<'a> Run<'a> {
    pub fn new(gw: &'a Gateway, route: &'a RouteState) -> Self {
        Run { gw, route, cost: 0 }
    }

    pub fn small_up(&self) -> Result<&'a Upstream, GatewayError> {
        self.gw.upstream(self.route.cfg.small)
    }

    pub fn large_up(&self) -> Result<&'a Upstream, GatewayError> {
        self.gw.upstream(self.route.cfg.large)
    }

    fn reserve(&self, call: &Call) -> Option<Held> {
        let est = self
            .large_up()
            .ok()?
            .estimate(&call.messages, call.max_tokens);
        self.route.budget.try_reserve(est, super::unix_now())
    }

    fn exhausted(&self) -> GatewayError {
        GatewayError::BudgetExhausted(self.route.name().to_string())
    }

    fn refuses(&self) -> bool {
        self.route.cfg.cfg.on_exhausted == OnExhausted::Refuse
    }

    fn plan(target: Target, draft: Option<Completion>, score: Option<f32>, capped: bool) -> Plan {
        Plan {
            target,
            draft,
            score,
            capped,
        }
    }

    /// The large model if its budget allows, else the small one (or a 429).
    pub fn plan_large(&self, call: &Call) -> Result<Plan, GatewayError> {
        match self.reserve(call) {
            Some(held) => Ok(Self::plan(Target::Large(held), None, None, false)),
            None if self.refuses() || self.route.cfg.small.is_none() => Err(self.exhausted()),
            None => Ok(Self::plan(Target::Small, None, None, true)),
        }
    }

    pub fn plan_small(&self, call: &Call) -> Result<Plan, GatewayError> {
        if self.route.cfg.small.is_none() {
            return self.plan_large(call);
        }
        Ok(Self::plan(Target::Small, None, None, false))
    }

    /// Asks the route's gate; the budget is reserved inside the decision, so a refusal routes small.
    fn decide(&self, score: f32, call: &Call) -> Result<(Pick, Option<Held>, bool), GatewayError> {
        let d = self.route.gate().decide_by(score, || self.reserve(call));
        if d.capped && self.refuses() {
            return Err(self.exhausted());
        }
        Ok((d.route, d.reservation, d.capped))
    }

    /// LONDI: the route's controller picks the model for this step of `episode` from the last
    /// user message and the step index; its per-episode budget of large calls is hard, and the
    /// route's money budget is still checked at the call.
    pub fn plan_switching(
        &self,
        episode: &str,
        messages: &[tandem_core::Message],
        call: &Call,
        learn: bool,
    ) -> Result<Plan, GatewayError> {
        let text = messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or("", |m| m.content.as_str());
        let Some(mut c) = self.route.switch() else {
            return Err(GatewayError::Internal(
                "switching route without a controller".into(),
            ));
        };
        let state = tandem_core::londi::SwitchState {
            text,
            step: c.steps(episode),
            ..Default::default()
        };
        let d = c.decide(episode, &state, learn);
        if !learn {
            c.exclude_from_learning(episode);
        }
        drop(c);
        let mut plan = match d.choice {
            tandem_core::londi::Switch::Large => self.plan_large(call)?,
            tandem_core::londi::Switch::Small => self.plan_small(call)?,
        };
        plan.score = Some(d.q_large - d.q_small);
        Ok(plan)
    }

    pub fn plan_route_before(&self, q: &Query, call: &Call) -> Result<Plan, GatewayError> {
        let model = self.route.model.load();
        let score = match (&**model, model.scratch()) {
            (Learned::Router(r), Some(mut s)) => r.score_ref(q, &mut s),
            _ => 0.0,
        };
        let (pick, held, capped) = self.decide(score, call)?;
        let target = match (pick, held) {
            (Pick::Strong, Some(h)) => Target::Large(h),
            (Pick::Both, Some(h)) => Target::Both(h),
            _ => Target::Small,
        };
        Ok(Self::plan(target, None, Some(score), capped))
    }

    /// The small model answers (with log-probabilities); the gate judges the answer.
    pub async fn plan_cascade(&mut self, q: &Query, call: &Call) -> Result<Plan, GatewayError> {
        let small_call = Call {
            logprobs: true,
            ..call.clone()
        };
        let small = self.small_up()?;
        let s = small.complete(&small_call).await?;
        self.cost += small.cost(s.usage);
        let score = match self.route.cfg.cfg.gate {
            // Unknown confidence escalates: an upstream without log-probabilities cannot vouch.
            CascadeGate::Logprob => mean(s.token_logprobs.as_ref()).map_or(f32::INFINITY, |m| -m),
            CascadeGate::Energy => mean(s.token_energies.as_ref()).unwrap_or(f32::INFINITY),
            CascadeGate::Learned => {
                let model = self.route.model.load();
                match (&**model, model.scratch()) {
                    (Learned::Cascade(c), Some(mut sc)) => {
                        c.score_ref(q, &to_answer(&small.name, &s), &mut sc)
                    }
                    _ => 0.0,
                }
            }
        };
        let (pick, held, capped) = self.decide(score, call)?;
        let target = match (pick, held) {
            (Pick::Strong | Pick::Both, Some(h)) => Target::Large(h),
            _ => Target::Small,
        };
        Ok(Self::plan(target, Some(s), Some(score), capped))
    }

    /// The large model's call: with the small draft as a hint when the route asks for S4L.
    fn large_call(&self, call: &Call, draft: Option<&Completion>) -> Call {
        match draft.filter(|_| self.route.cfg.cfg.s4l) {
            Some(d) => Call {
                messages: with_hint(&call.messages, &d.text),
                ..call.clone()
            },
            None => call.clone(),
        }
    }

    async fn call_small(&mut self, call: &Call) -> Result<Completion, GatewayError> {
        let up = self.small_up()?;
        let c = up.complete(call).await?;
        self.cost += up.cost(c.usage);
        Ok(c)
    }

    /// Calls the large model on a held reservation, settling it with the real cost (or releasing
    /// it when the call failed: nothing was spent).
    async fn call_large(&mut self, call: &Call, held: Held) -> Result<Completion, GatewayError> {
        let up = self.large_up()?;
        match up.complete(call).await {
            Ok(c) => {
                let cost = up.cost(c.usage);
                held.settle(cost);
                self.cost += cost;
                Ok(c)
            }
            Err(e) => {
                held.release();
                Err(e)
            }
        }
    }

    fn done(&self, small: Option<Completion>, large: Option<Completion>, p: &PlanInfo) -> Done {
        Done {
            served: if large.is_some() {
                Served::Large
            } else {
                Served::Small
            },
            small,
            large,
            score: p.score,
            capped: p.capped,
            cost: self.cost,
        }
    }

    /// The small draft stands in when the large model fails: a real answer beats an error.
    fn fall_back(&self, e: &GatewayError) {
        tracing::warn!(route = self.route.name(), error = %e, "large model failed; serving the small draft");
        metrics::counter!("tandem_fallbacks_total", "route" => self.route.name().to_string())
            .increment(1);
    }

    /// Carries the plan out and returns whole answers.
    pub async fn whole(
        &mut self,
        q: &Query,
        call: &Call,
        plan: Plan,
        learn: bool,
    ) -> Result<Done, GatewayError> {
        let info = PlanInfo::of(&plan);
        match plan.target {
            Target::Small => {
                let s = match plan.draft {
                    Some(d) => d,
                    None => self.call_small(call).await?,
                };
                Ok(self.done(Some(s), None, &info))
            }
            Target::Large(held) => {
                let lc = self.large_call(call, plan.draft.as_ref());
                match (self.call_large(&lc, held).await, plan.draft) {
                    (Ok(l), draft) => {
                        if let Some(d) = &draft {
                            self.teach(q, d, &l, learn, true);
                        }
                        Ok(self.done(draft, Some(l), &info))
                    }
                    (Err(e), Some(d)) => {
                        self.fall_back(&e);
                        Ok(self.done(Some(d), None, &info))
                    }
                    (Err(e), None) => Err(e),
                }
            }
            Target::Both(held) => {
                let (small_up, large_up) = (self.small_up()?, self.large_up()?);
                let (s, l) = tokio::join!(small_up.complete(call), large_up.complete(call));
                let l = match l {
                    Ok(l) => {
                        let cost = large_up.cost(l.usage);
                        held.settle(cost);
                        self.cost += cost;
                        l
                    }
                    Err(e) => {
                        held.release();
                        return Err(e);
                    }
                };
                let s = s.ok();
                if let Some(s) = &s {
                    self.cost += small_up.cost(s.usage);
                    self.teach(q, s, &l, learn, false);
                }
                Ok(self.done(s, Some(l), &info))
            }
        }
    }

    /// Carries the plan out, streaming the served answer when it need not be judged first: the
    /// small model's own answer (no draft), or the large model's. Otherwise returns it whole.
    pub async fn streamed(
        &mut self,
        q: &Query,
        call: &Call,
        plan: Plan,
        learn: bool,
    ) -> Result<Result<Streaming, Done>, GatewayError> {
        let info = PlanInfo::of(&plan);
        match plan.target {
            Target::Small if plan.draft.is_none() => {
                let pieces = self.small_up()?.stream(call).await?;
                Ok(Ok(self.streaming(pieces, None, Served::Small, None, &info)))
            }
            Target::Large(held) => {
                let lc = self.large_call(call, plan.draft.as_ref());
                match (self.large_up()?.stream(&lc).await, plan.draft) {
                    (Ok(pieces), draft) => Ok(Ok(self.streaming(
                        pieces,
                        Some(held),
                        Served::Large,
                        draft,
                        &info,
                    ))),
                    (Err(e), Some(d)) => {
                        held.release();
                        self.fall_back(&e);
                        Ok(Err(self.done(Some(d), None, &info)))
                    }
                    (Err(e), None) => {
                        held.release();
                        Err(e)
                    }
                }
            }
            target => {
                let plan = Plan {
                    target,
                    draft: plan.draft,
                    score: info.score,
                    capped: info.capped,
                };
                Ok(Err(self.whole(q, call, plan, learn).await?))
            }
        }
    }

    fn streaming(
        &self,
        pieces: Pieces,
        held: Option<Held>,
        served: Served,
        draft: Option<Completion>,
        p: &PlanInfo,
    ) -> Streaming {
        Streaming {
            pieces,
            held,
            served,
            draft,
            score: p.score,
            capped: p.capped,
            cost: self.cost,
        }
    }

    /// The large answer grades the small one: the cheap route learns to imitate the expensive one.
    pub fn teach(
        &self,
        q: &Query,
        small: &Completion,
        large: &Completion,
        learn: bool,
        with_draft: bool,
    ) {
        if !learn {
            return;
        }
        let small_answer = with_draft
            .then(|| self.small_up().ok().map(|u| to_answer(&u.name, small)))
            .flatten();
        self.gw.learn(
            self.route.index,
            LearnEvent {
                query: q.clone(),
                small: small_answer,
                observed: Observation {
                    weak: Some(agreement(&small.text, &large.text)),
                    strong: Some(1.0),
                },
            },
        );
    }
}

/// What a plan decided, kept once its target is consumed.
struct PlanInfo {
    score: Option<f32>,
    capped: bool,
}

impl PlanInfo {
    fn of(p: &Plan) -> PlanInfo {
        PlanInfo {
            score: p.score,
            capped: p.capped,
        }
    }
}
