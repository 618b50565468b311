//! One request's calls. A route whose policy decides — a cascade of tiers, a two-model cascade,
//! a route-before router — runs on the core's engine, call by call (`tiers`). A fixed route, a
//! forced model or a switching route's step first makes a [`Plan`] (which model serves, with
//! the large call's budget already reserved), then carries it out whole or streamed.
//! Each model is a group of upstreams ([`crate::resilience`]): a failed call moves to the next
//! upstream of the group (retried after a backoff), and a stream can still move until its first
//! piece of answer. A small group that cannot serve hands the request to the large one, within
//! the budget. One reservation, the most any upstream of the large group could cost, covers all
//! of a request's large attempts.

mod tiers;

pub(crate) use tiers::TierOutcome;

use super::{Ctx, Gateway};
use crate::budget::Held;
use crate::config::OnExhausted;
use crate::error::GatewayError;
use crate::feedback::Served;
use crate::resilience::{Attempts, Group, Ticket};
use crate::route::RouteState;
use crate::upstream::{relay, until_answer, Call, Completion, Pieces, Upstream};
use serde_json::{json, Value};
use tandem_core::engine::Next;
use tandem_core::Micros;

pub(super) enum Target {
    Small,
    Large(Held),
}

/// What a fixed, forced or switching route's decision picked, with the large call's budget
/// already reserved when it picked large.
pub(super) struct Plan {
    pub target: Target,
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
    /// The two-model roles called so far (bit 0 small, bit 1 large).
    roles: std::sync::atomic::AtomicU8,
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
            roles: std::sync::atomic::AtomicU8::new(0),
        }
    }

    /// How many of the two models (small, large) this request called.
    pub fn models_called(&self) -> usize {
        self.roles
            .load(std::sync::atomic::Ordering::Relaxed)
            .count_ones() as usize
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
        let bit = match role {
            Role::Small => 1,
            Role::Large => 2,
            Role::Tier(_) => 0,
        };
        self.roles
            .fetch_or(bit, std::sync::atomic::Ordering::Relaxed);
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

    fn plan(target: Target, score: Option<f32>, capped: bool) -> Plan {
        Plan {
            target,
            score,
            capped,
        }
    }

    /// The large model if its budget allows, else the small one (or a 429).
    pub fn plan_large(&self, call: &Call) -> Result<Plan, GatewayError> {
        match self.reserve(call) {
            Some(held) => Ok(Self::plan(Target::Large(held), None, false)),
            None if self.refuses() || self.route.cfg.small.is_none() => Err(self.exhausted()),
            None => Ok(Self::plan(Target::Small, None, true)),
        }
    }

    pub fn plan_small(&self, call: &Call) -> Result<Plan, GatewayError> {
        if self.route.cfg.small.is_none() {
            return self.plan_large(call);
        }
        Ok(Self::plan(Target::Small, None, false))
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

    /// Makes the plan's large reservation durable (journaled, or taken in the shared store)
    /// before anything is called for it. The shared store can still refuse what this replica's
    /// own count allowed — the other replicas spent the cap, or Redis cannot be asked — and
    /// that refusal is handled as the local cap's is: the small model serves, or the request is
    /// refused on a route that refuses or has no small model.
    pub async fn confirm(&self, plan: Plan) -> Result<Plan, GatewayError> {
        let Target::Large(held) = &plan.target else {
            return Ok(plan);
        };
        match held.durable().await {
            Ok(()) => Ok(plan),
            Err(e) if e.is_budget_refusal() => {
                // Released as it drops: its durable step failed, so no call was made on it.
                drop(plan.target);
                if self.refuses() || self.route.cfg.small.is_none() {
                    return Err(e);
                }
                metrics::counter!("tandem_shared_budget_refusals_total", "route" => self.route.name().to_string(), "why" => e.code().unwrap_or("budget").to_string())
                    .increment(1);
                Ok(Self::plan(Target::Small, plan.score, true))
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
            Some(held) => Ok(Self::plan(Target::Large(held), None, false)),
            None => Err(e),
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
                Target::Large(held) => Ok((self.call_large(call, held).await?, Served::Large)),
                _ => Err(GatewayError::Internal("no model to serve".into())),
            },
            Err(e) => Err(e),
        }
    }

    /// Calls the large model on a held reservation, settling it with the real cost (an estimate
    /// when the upstream reports no usage), or releasing it when no attempt succeeded.
    async fn call_large(&mut self, call: &Call, held: Held) -> Result<Completion, GatewayError> {
        // The reservation is on disk before any attempt is made (a crash cannot forget it).
        held.durable().await?;
        let (r, n) = self
            .complete_on(Role::Large, &|up| self.call_for(up, call))
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
    pub async fn whole(&mut self, call: &Call, plan: Plan) -> Result<Done, GatewayError> {
        let info = PlanInfo::of(&plan);
        match plan.target {
            Target::Small => match self.call_small_or_large(call).await? {
                (c, Served::Small) => Ok(self.done(Some(c), None, &info)),
                (c, Served::Large) => Ok(self.done(None, Some(c), &info)),
            },
            Target::Large(held) => {
                let l = self.call_large(call, held).await?;
                Ok(self.done(None, Some(l), &info))
            }
        }
    }

    /// Carries the plan out, streaming the served answer.
    pub async fn streamed(
        &mut self,
        call: &Call,
        plan: Plan,
    ) -> Result<Result<Streaming, Done>, GatewayError> {
        let info = PlanInfo::of(&plan);
        match plan.target {
            Target::Small => {
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
                        Target::Large(held) => self.stream_large(call, held, &info).await,
                        Target::Small => Err(GatewayError::Internal("no model to serve".into())),
                    },
                    Err(e) => Err(e),
                }
            }
            Target::Large(held) => self.stream_large(call, held, &info).await,
        }
    }

    async fn stream_large(
        &mut self,
        call: &Call,
        held: Held,
        info: &PlanInfo,
    ) -> Result<Result<Streaming, Done>, GatewayError> {
        held.durable().await?;
        let (r, n) = self
            .stream_on(Role::Large, &|up| self.call_for(up, call))
            .await;
        self.tried += n;
        self.mark(&held);
        match r {
            Ok(started) => Ok(Ok(self.streaming(
                started,
                Some(held),
                Served::Large,
                None,
                info,
            ))),
            Err(e) => {
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
