//! One request's decision and calls. First a [`Plan`]: which model serves (and, for a cascade,
//! the small model's draft, judged), with the large call's budget already reserved; then the plan
//! is carried out whole, or streamed when the client asked and the answer need not be judged.
//! Each model is a group of upstreams ([`crate::resilience`]): a failed call moves to the next
//! upstream of the group (retried after a backoff), and a stream can still move until its first
//! piece of answer. A small group that cannot serve hands the request to the large one, within
//! the budget; a large group that fails falls back to a usable small draft. One reservation, the
//! most any upstream of the large group could cost, covers all of a request's large attempts.

mod tiers;

pub(crate) use tiers::TierOutcome;

use super::judge::{judge, Verdict};
use super::{to_answer, with_hint, Ctx, Gateway};
use crate::budget::Held;
use crate::config::{CascadeGate, OnExhausted};
use crate::error::GatewayError;
use crate::feedback::Served;
use crate::resilience::{Attempts, Group, Ticket};
use crate::route::{LearnEvent, Learned, RouteState};
use crate::upstream::{relay, until_answer, Call, Completion, Pieces, Upstream};
use serde_json::{json, Value};
use tandem_core::engine::Next;
use tandem_core::policy::gate::Route as Pick;
use tandem_core::policy::response::agreement;
use tandem_core::policy::Observation;
use tandem_core::Micros;

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
    /// The draft may be served if the large model fails (not empty, not an invalid tool call).
    pub draft_usable: bool,
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
    /// Upstream calls made.
    pub tried: u32,
    /// An engine cascade: where it ended, and its walk (for feedback to teach the policy).
    pub tiers: Option<TierOutcome>,
    pub walk: Option<Box<tandem_core::engine::Walk>>,
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
    pub tried: u32,
    /// The streamed call as sent, to bound its cost when the upstream reports no usage.
    pub call: Call,
    /// The upstream streaming (its index).
    pub by: usize,
    /// An engine cascade: where it ended, and its walk, open until the streamed answer is
    /// whole (then the policy judges nothing more but learns from it).
    pub tiers: Option<TierOutcome>,
    pub walk: Option<Box<tandem_core::engine::Walk>>,
}

/// Which of a route's models: the two-model roles, or a tier of an engine cascade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Small,
    Large,
    Tier(usize),
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Small => "small",
            Role::Large => "large",
            Role::Tier(i) => tier_name(i),
        }
    }

    /// Its calls are paid through the route's budget (and may be billed without an answer).
    fn metered(self) -> bool {
        match self {
            Role::Small | Role::Tier(0) => false,
            Role::Large | Role::Tier(_) => true,
        }
    }
}

/// A tier's name in metrics and logs.
pub(crate) fn tier_name(i: usize) -> &'static str {
    const NAMES: [&str; crate::config::MAX_TIERS] = [
        "tier0", "tier1", "tier2", "tier3", "tier4", "tier5", "tier6", "tier7",
    ];
    NAMES.get(i).copied().unwrap_or("tier")
}

pub(super) struct Run<'a> {
    pub gw: &'a Gateway,
    pub route: &'a RouteState,
    pub cost: Micros,
    pub tried: u32,
    /// When the route's `deadline_ms` passes, counted from the request's start.
    deadline: Option<tokio::time::Instant>,
    /// The last large reservation asked for (micro-dollars), to tell a request that can never
    /// fit the cap from a budget that is spent.
    asked: std::sync::atomic::AtomicU64,
    /// A large attempt may have been billed without an answer (see [`Held::mark_uncertain`]).
    large_uncertain: std::sync::atomic::AtomicBool,
}

impl<'a> Run<'a> {
    pub fn new(gw: &'a Gateway, route: &'a RouteState) -> Self {
        Run {
            gw,
            route,
            cost: 0,
            tried: 0,
            deadline: route
                .cfg
                .cfg
                .deadline_ms
                .map(|ms| tokio::time::Instant::now() + std::time::Duration::from_millis(ms)),
            asked: std::sync::atomic::AtomicU64::new(0),
            large_uncertain: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Keeps `held` whole if a large attempt may have been billed without an answer.
    fn mark(&self, held: &Held) {
        if self
            .large_uncertain
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            held.mark_uncertain();
        }
    }

    fn past_deadline(&self) -> GatewayError {
        GatewayError::DeadlineExceeded {
            route: self.route.name().to_string(),
            ms: self.route.cfg.cfg.deadline_ms.unwrap_or(0),
        }
    }

    /// Runs `f` until the request's deadline, if the route sets one.
    async fn by_deadline<T>(&self, f: impl std::future::Future<Output = T>) -> Option<T> {
        match self.deadline {
            Some(d) => tokio::time::timeout_at(d, f).await.ok(),
            None => Some(f.await),
        }
    }

    fn group(&self, role: Role) -> Result<&'a Group, GatewayError> {
        match role {
            Role::Small => self.route.cfg.small.as_ref(),
            Role::Large => self.route.cfg.large.as_ref(),
            Role::Tier(i) => self.route.cfg.tiers.get(i),
        }
        .ok_or_else(|| GatewayError::Internal(format!("route without its {} model", role.name())))
    }

    /// What an answer cost, at the prices of the upstream that gave it.
    pub fn cost_of(&self, c: &Completion) -> Micros {
        self.gw.upstreams.get(c.by).map_or(0, |u| u.cost(c.usage))
    }

    /// Walks `role`'s group for one request: each attempt goes to the next upstream that may
    /// serve, until one succeeds (`on_ok` then takes the result and the upstream's ticket) or none
    /// is left. Returns the result or the error that ended the walk, and the attempts made.
    async fn walk<T, R, Fut>(
        &self,
        role: Role,
        attempt: impl Fn(&'a Upstream) -> Fut,
        on_ok: impl Fn(T, Ticket, &'a Upstream) -> R,
    ) -> (Result<R, GatewayError>, u32)
    where
        Fut: std::future::Future<Output = Result<T, GatewayError>>,
    {
        let group = match self.group(role) {
            Ok(g) => g,
            Err(e) => return (Err(e), 0),
        };
        let mut at = Attempts::new(
            &self.gw.upstreams,
            group,
            role.name(),
            self.gw.next_seed(self.route),
        );
        let mut tried = 0;
        loop {
            // Waiting for a backoff or a free slot counts against the deadline too.
            let Some(next) = self.by_deadline(at.next()).await else {
                return (Err(self.past_deadline()), tried);
            };
            let Some((up, ticket)) = next else {
                break;
            };
            if tried > 0 {
                self.retried(role);
            }
            tried += 1;
            match self.by_deadline(attempt(up)).await {
                Some(Ok(t)) => return (Ok(on_ok(t, ticket, up)), tried),
                Some(Err(e)) => {
                    if role.metered() && may_have_billed(&e) {
                        self.large_uncertain
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    if let Err(e) = at.failed(up, ticket, e) {
                        return (Err(e), tried);
                    }
                }
                None => {
                    if role.metered() {
                        self.large_uncertain
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    // The upstream had not answered when the deadline came: as good as a timeout.
                    let e = GatewayError::UpstreamTimeout {
                        upstream: up.name.clone(),
                        ms: self.route.cfg.cfg.deadline_ms.unwrap_or(0),
                    };
                    let _ = at.failed(up, ticket, e);
                    return (Err(self.past_deadline()), tried);
                }
            }
        }
        (Err(at.error()), tried)
    }

    /// One whole call to `role`'s group, each attempt with the call `make` builds for its upstream.
    async fn complete_on(
        &self,
        role: Role,
        make: &(dyn Fn(&Upstream) -> Call + Sync),
    ) -> (Result<Completion, GatewayError>, u32) {
        self.walk(
            role,
            |up| async move { up.complete(&make(up)).await },
            |c, ticket, _| {
                ticket.finish(true);
                c
            },
        )
        .await
    }

    /// A streamed call to `role`'s group, moving to the next upstream on any failure before the
    /// first piece of answer. Returns the stream, the call as sent and the upstream streaming.
    async fn stream_on(
        &self,
        role: Role,
        make: &(dyn Fn(&Upstream) -> Call + Sync),
    ) -> (Result<(Pieces, Call, usize), GatewayError>, u32) {
        self.walk(
            role,
            |up| async move {
                let call = make(up);
                let rx = up.stream(&call).await?;
                let (head, rx) = until_answer(rx, &up.name).await?;
                Ok((head, rx, call))
            },
            |(head, rx, call), ticket, up| (relay(head, rx, ticket), call, up.index),
        )
        .await
    }

    fn retried(&self, role: Role) {
        metrics::counter!("tandem_upstream_retries_total", "route" => self.route.name().to_string(), "role" => role.name())
            .increment(1);
    }

    /// The call as sent to `up`: the client's body, with the route's token cap when one is
    /// configured (a larger cap of the client's lowered in the field it used; none given: the
    /// upstream's `token_param` added).
    pub fn call_for(&self, up: &Upstream, base: &Call) -> Call {
        let Some(cap) = self.route.cfg.cfg.max_tokens else {
            return base.clone();
        };
        let mut c = base.clone();
        let mut given = false;
        for f in ["max_completion_tokens", "max_tokens"] {
            match base.get(f) {
                None => {}
                // A cap the client named (or nulled) is lowered in its own field.
                Some(Value::Null) => {
                    given = true;
                    c = c.with(f, Some(json!(cap)));
                }
                Some(v) => {
                    given = true;
                    // A value that is not a number goes on as sent: the upstream's 400 says why.
                    if v.as_u64().is_some_and(|v| v > u64::from(cap)) {
                        c = c.with(f, Some(json!(cap)));
                    }
                }
            }
        }
        if !given {
            c = c.with(up.cfg.token_param.field(), Some(json!(cap)));
        }
        c
    }

    /// Reserves the most any upstream of the large group could cost for this call: a request
    /// that moves to another upstream is still covered, and can never pass the cap.
    fn reserve(&self, call: &Call) -> Option<Held> {
        let est = self
            .group(Role::Large)
            .ok()?
            .members
            .iter()
            .filter_map(|&i| self.gw.upstreams.get(i))
            .map(|up| up.estimate(&self.call_for(up, call)))
            .max()?;
        self.asked.store(est, std::sync::atomic::Ordering::Relaxed);
        self.route.budget.try_reserve(est, super::unix_now())
    }

    fn exhausted(&self) -> GatewayError {
        let cap = self.route.budget.limits().max_micros;
        if let Some(cap) =
            cap.filter(|&c| self.asked.load(std::sync::atomic::Ordering::Relaxed) > c)
        {
            // Spent or not, this request can never fit: waiting for the window would not help.
            return GatewayError::OverBudget {
                route: self.route.name().to_string(),
                estimate_micros: self.asked.load(std::sync::atomic::Ordering::Relaxed),
                cap_micros: cap,
            };
        }
        if let Some(why) = self.route.refused_state() {
            return GatewayError::BudgetClosed {
                route: self.route.name().to_string(),
                reason: why.to_string(),
            };
        }
        GatewayError::BudgetExhausted {
            route: self.route.name().to_string(),
            retry_after_s: self.route.budget.seconds_to_reset(super::unix_now()),
        }
    }

    fn refuses(&self) -> bool {
        self.route.cfg.cfg.on_exhausted == OnExhausted::Refuse
    }

    fn plan(target: Target, draft: Option<Completion>, score: Option<f32>, capped: bool) -> Plan {
        Plan {
            target,
            draft_usable: draft.is_some(),
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

    /// LONDI: the route's engine picks the entry tier for this step of an episode — its
    /// switching policy (the core's) reads the episode, the last user message and the tools
    /// offered from the query's metadata; its per-episode budget of large calls is hard, and the
    /// route's money budget is still checked at the call. The route serves the step with its two
    /// models as any route does: the walk ends at its entry (the policy learns from episodes'
    /// rewards, not from the answer).
    pub fn plan_switching(&self, ctx: &Ctx, call: &Call) -> Result<Plan, GatewayError> {
        let Some(mut engine) = self.route.switch_engine() else {
            return Err(GatewayError::Internal(
                "switching route without an engine".into(),
            ));
        };
        let (top, tiers) = (engine.top(), engine.tiers());
        // The policy reads no price: it decides before any call, from the query alone.
        let walk = engine
            .begin(&ctx.query, vec![0; tiers])
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        drop(engine);
        let large = matches!(walk.next(), Next::Call { tier, .. } if tier == top);
        let mut plan = if large {
            self.plan_large(call)?
        } else {
            self.plan_small(call)?
        };
        plan.score = Some(walk.item().score);
        Ok(plan)
    }

    pub fn plan_route_before(&self, ctx: &Ctx, call: &Call) -> Result<Plan, GatewayError> {
        let model = self.route.model.load();
        let score = match (&**model, model.scratch()) {
            (Learned::Router(r), Some(mut s)) => r.score_ref(&ctx.query, &mut s),
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

    /// The small model answers (with log-probabilities when the gate reads them); the draft is
    /// judged — an empty answer, a refusal or an invalid tool call escalates whatever its score
    /// — then scored by the gate. A small model that fails hands the request to the large one.
    pub async fn plan_cascade(&mut self, ctx: &Ctx, call: &Call) -> Result<Plan, GatewayError> {
        // Only the `learned` gate comes here (the others run on the engine, `tiers`): it reads
        // the draft's text, not its log-probabilities.
        let small_call = |up: &Upstream| self.call_for(up, call);
        let (s, n) = self.complete_on(Role::Small, &small_call).await;
        self.tried += n;
        let s = match s {
            Ok(s) => s,
            Err(e) if e.is_upstream() => return self.small_failed(e, call),
            Err(e) => return Err(e),
        };
        self.cost += self.cost_of(&s);
        let verdict = judge(&s.draft, &ctx.tools, ctx.tool_choice.as_deref());
        if verdict != Verdict::Valid {
            metrics::counter!("tandem_draft_rejected_total", "route" => self.route.name().to_string(), "why" => verdict.name())
                .increment(1);
            // An unusable draft goes up whatever the gate says; the budget still decides.
            let (target, capped) = match self.reserve(call) {
                Some(h) => (Target::Large(h), false),
                None if self.refuses() => return Err(self.exhausted()),
                None => (Target::Small, true),
            };
            return Ok(Plan {
                target,
                draft: Some(s),
                draft_usable: false,
                score: Some(f32::INFINITY),
                capped,
            });
        }
        let score = match self.route.cfg.cfg.gate {
            // Engine gates never come here: their routes run on the engine (`tiers`), the
            // two-model logprob and energy gates too (`route::engine_cascade`).
            CascadeGate::Logprob | CascadeGate::Energy | CascadeGate::Ocl | CascadeGate::Random => {
                0.0
            }
            CascadeGate::Learned => {
                let model = self.route.model.load();
                match (&**model, model.scratch()) {
                    (Learned::Cascade(c), Some(mut sc)) => {
                        let name = self.gw.upstreams.get(s.by).map_or("", |u| u.name.as_str());
                        c.score_ref(&ctx.query, &to_answer(name, &s), &mut sc)
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

    /// Makes the plan's large reservation durable (journaled, or taken in the shared store)
    /// before anything is called for it. The shared store can still refuse what this replica's
    /// own count allowed — the other replicas spent the cap, or Redis cannot be asked — and
    /// that refusal is handled as the local cap's is: the small model serves (its draft, if
    /// made), or the request is refused on a route that refuses or has no small model.
    pub async fn confirm(&self, plan: Plan) -> Result<Plan, GatewayError> {
        let held = match &plan.target {
            Target::Large(h) | Target::Both(h) => h,
            Target::Small => return Ok(plan),
        };
        match held.durable().await {
            Ok(()) => Ok(plan),
            Err(e) if e.is_budget_refusal() => {
                let Plan {
                    target,
                    draft,
                    draft_usable,
                    score,
                    ..
                } = plan;
                // Released: its durable step failed, so no call was made on it.
                drop(target);
                if self.refuses() || (draft.is_none() && self.route.cfg.small.is_none()) {
                    return Err(e);
                }
                metrics::counter!("tandem_shared_budget_refusals_total", "route" => self.route.name().to_string(), "why" => e.code().unwrap_or("budget").to_string())
                    .increment(1);
                Ok(Plan {
                    target: Target::Small,
                    draft,
                    draft_usable,
                    score,
                    capped: true,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// The small model could not serve: the large one does, if the budget allows; else the
    /// small model's error stands.
    fn small_failed(&self, e: GatewayError, call: &Call) -> Result<Plan, GatewayError> {
        if self.route.cfg.large.is_none() {
            return Err(e);
        }
        // The error's kind, not its text: upstream messages may quote the prompt.
        tracing::warn!(
            route = self.route.name(),
            error_type = e.kind(),
            error_code = e.code(),
            status = e.status().as_u16(),
            "small model failed; trying the large one"
        );
        metrics::counter!("tandem_small_failures_total", "route" => self.route.name().to_string())
            .increment(1);
        match self.reserve(call) {
            Some(held) => Ok(Self::plan(Target::Large(held), None, None, false)),
            None => Err(e),
        }
    }

    /// The large model's call to `up`: with the small draft as a hint when the route asks for S4L.
    fn large_call(&self, up: &Upstream, call: &Call, draft: Option<&Completion>) -> Call {
        let base = self.call_for(up, call);
        match draft.filter(|_| self.route.cfg.cfg.s4l) {
            Some(d) => {
                let messages = call
                    .get("messages")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                base.with(
                    "messages",
                    Some(Value::Array(with_hint(&messages, &d.text()))),
                )
            }
            None => base,
        }
    }

    /// Calls the small model; when it cannot serve, the large one on a fresh reservation.
    async fn call_small_or_large(
        &mut self,
        call: &Call,
    ) -> Result<(Completion, Served), GatewayError> {
        let (r, n) = self
            .complete_on(Role::Small, &|up| self.call_for(up, call))
            .await;
        self.tried += n;
        match r {
            Ok(c) => {
                self.cost += self.cost_of(&c);
                Ok((c, Served::Small))
            }
            Err(e) if e.is_upstream() => match self.small_failed(e, call)?.target {
                Target::Large(held) => {
                    Ok((self.call_large(call, None, held).await?, Served::Large))
                }
                _ => Err(GatewayError::Internal("no model to serve".into())),
            },
            Err(e) => Err(e),
        }
    }

    /// Calls the large model on a held reservation, settling it with the real cost (an estimate
    /// when the upstream reports no usage), or releasing it when no attempt succeeded.
    async fn call_large(
        &mut self,
        call: &Call,
        draft: Option<&Completion>,
        held: Held,
    ) -> Result<Completion, GatewayError> {
        // The reservation is on disk before any attempt is made (a crash cannot forget it).
        held.durable().await?;
        let (r, n) = self
            .complete_on(Role::Large, &|up| self.large_call(up, call, draft))
            .await;
        self.tried += n;
        self.mark(&held);
        match r {
            Ok(c) => {
                let cost = self.cost_of(&c);
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
            tried: self.tried,
            tiers: None,
            walk: None,
        }
    }

    /// A usable small draft stands in when the large model fails: a real answer beats an error.
    fn fall_back(&self, e: &GatewayError) {
        tracing::warn!(
            route = self.route.name(),
            error_type = e.kind(),
            error_code = e.code(),
            status = e.status().as_u16(),
            "large model failed; serving the small draft"
        );
        metrics::counter!("tandem_fallbacks_total", "route" => self.route.name().to_string())
            .increment(1);
    }

    /// Carries the plan out and returns whole answers.
    pub async fn whole(
        &mut self,
        ctx: &Ctx,
        call: &Call,
        plan: Plan,
    ) -> Result<Done, GatewayError> {
        let info = PlanInfo::of(&plan);
        match plan.target {
            Target::Small => match plan.draft {
                Some(d) => Ok(self.done(Some(d), None, &info)),
                None => match self.call_small_or_large(call).await? {
                    (c, Served::Small) => Ok(self.done(Some(c), None, &info)),
                    (c, Served::Large) => Ok(self.done(None, Some(c), &info)),
                },
            },
            Target::Large(held) => {
                match (
                    self.call_large(call, plan.draft.as_ref(), held).await,
                    plan.draft,
                ) {
                    (Ok(l), draft) => {
                        if let Some(d) = &draft {
                            self.teach(ctx, d, &l, true);
                        }
                        Ok(self.done(draft, Some(l), &info))
                    }
                    (Err(e), Some(d)) if plan.draft_usable => {
                        self.fall_back(&e);
                        Ok(self.done(Some(d), None, &info))
                    }
                    (Err(e), _) => Err(e),
                }
            }
            Target::Both(held) => {
                held.durable().await?;
                let small_make = |up: &Upstream| self.call_for(up, call);
                let large_make = |up: &Upstream| self.large_call(up, call, None);
                let ((s, ns), (l, nl)) = tokio::join!(
                    self.complete_on(Role::Small, &small_make),
                    self.complete_on(Role::Large, &large_make)
                );
                self.tried += ns + nl;
                self.mark(&held);
                let l = match l {
                    Ok(l) => {
                        let cost = self.cost_of(&l);
                        held.settle(cost);
                        self.cost += cost;
                        l
                    }
                    Err(e) => {
                        held.release();
                        // Exploration is the gateway's own wish: the small answer still serves.
                        return match s {
                            Ok(s) => {
                                self.cost += self.cost_of(&s);
                                Ok(self.done(Some(s), None, &info))
                            }
                            Err(_) => Err(e),
                        };
                    }
                };
                let s = s.ok();
                if let Some(s) = &s {
                    self.cost += self.cost_of(s);
                    self.teach(ctx, s, &l, false);
                }
                Ok(self.done(s, Some(l), &info))
            }
        }
    }

    /// Carries the plan out, streaming the served answer when it need not be judged first: the
    /// small model's own answer (no draft), or the large model's. Otherwise returns it whole.
    pub async fn streamed(
        &mut self,
        ctx: &Ctx,
        call: &Call,
        plan: Plan,
    ) -> Result<Result<Streaming, Done>, GatewayError> {
        let info = PlanInfo::of(&plan);
        match plan.target {
            Target::Small if plan.draft.is_none() => {
                let (r, n) = self
                    .stream_on(Role::Small, &|up| self.call_for(up, call))
                    .await;
                self.tried += n;
                match r {
                    Ok(started) => Ok(Ok(self.streaming(
                        started,
                        None,
                        Served::Small,
                        None,
                        &info,
                    ))),
                    Err(e) if e.is_upstream() => match self.small_failed(e, call)?.target {
                        Target::Large(held) => {
                            self.stream_large(call, held, None, false, &info).await
                        }
                        _ => Err(GatewayError::Internal("no model to serve".into())),
                    },
                    Err(e) => Err(e),
                }
            }
            Target::Large(held) => {
                self.stream_large(call, held, plan.draft, plan.draft_usable, &info)
                    .await
            }
            target => {
                let plan = Plan {
                    target,
                    draft: plan.draft,
                    draft_usable: plan.draft_usable,
                    score: info.score,
                    capped: info.capped,
                };
                Ok(Err(self.whole(ctx, call, plan).await?))
            }
        }
    }

    async fn stream_large(
        &mut self,
        call: &Call,
        held: Held,
        draft: Option<Completion>,
        draft_usable: bool,
        info: &PlanInfo,
    ) -> Result<Result<Streaming, Done>, GatewayError> {
        held.durable().await?;
        let (r, n) = self
            .stream_on(Role::Large, &|up| self.large_call(up, call, draft.as_ref()))
            .await;
        self.tried += n;
        self.mark(&held);
        match (r, draft) {
            (Ok(started), draft) => Ok(Ok(self.streaming(
                started,
                Some(held),
                Served::Large,
                draft,
                info,
            ))),
            (Err(e), Some(d)) if draft_usable => {
                held.release();
                self.fall_back(&e);
                Ok(Err(self.done(Some(d), None, info)))
            }
            (Err(e), _) => {
                held.release();
                Err(e)
            }
        }
    }

    /// `started`: the stream, the call as sent, and the upstream streaming.
    fn streaming(
        &self,
        started: (Pieces, Call, usize),
        held: Option<Held>,
        served: Served,
        draft: Option<Completion>,
        p: &PlanInfo,
    ) -> Streaming {
        let (pieces, call, by) = started;
        Streaming {
            pieces,
            held,
            served,
            draft,
            score: p.score,
            capped: p.capped,
            cost: self.cost,
            tried: self.tried,
            call,
            by,
            tiers: None,
            walk: None,
        }
    }

    /// The large answer grades the small one: the cheap route learns to imitate the expensive one.
    pub fn teach(&self, ctx: &Ctx, small: &Completion, large: &Completion, with_draft: bool) {
        if !ctx.learn {
            return;
        }
        let small_answer = with_draft
            .then(|| {
                self.gw
                    .upstreams
                    .get(small.by)
                    .map(|u| to_answer(&u.name, small))
            })
            .flatten();
        self.gw.learn(
            self.route.index,
            LearnEvent {
                query: ctx.query.clone(),
                small: small_answer,
                observed: Observation {
                    weak: Some(agreement(&small.text(), &large.text())),
                    strong: Some(1.0),
                },
            },
        );
    }
}

/// Whether a failed attempt may still be billed: it was sent and then timed out, or its
/// connection or body broke. An answered error (4xx, 5xx) is not billed by providers.
fn may_have_billed(e: &GatewayError) -> bool {
    matches!(
        e,
        GatewayError::UpstreamTimeout { .. } | GatewayError::Upstream { sent: true, .. }
    )
}

/// What a plan decided, kept once its target is consumed.
pub(super) struct PlanInfo {
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
