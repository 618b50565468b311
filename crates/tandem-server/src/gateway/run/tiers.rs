//! A cascade of tiers (`tiers = [...]`, or a gate only the engine has) carried out on the core's
//! engine: the engine says which tier to call next and whether its answer stands; this file
//! makes the calls. Each step up into a metered tier (every tier above the cheapest) first
//! reserves the most its group could cost against the route's budget (made durable, or taken in
//! Redis, before the call); a refusal leaves the deepest usable answer standing, or — on a route
//! that refuses — answers 429. A tier whose upstreams all fail is passed over: the item goes on
//! up, and at the top the deepest usable answer below serves. An answer that cannot serve (empty,
//! a refusal, an invalid tool call) goes up whatever the policy says. The answer that ends the
//! walk streams when the client asked and nothing is left to judge.

use super::{Done, Role, Run, Streaming};
use crate::config::CascadeGate;
use crate::error::GatewayError;
use crate::feedback::Served;
use crate::gateway::judge::{judge, Verdict};
use crate::gateway::{unix_now, with_hint, Ctx};
use crate::upstream::{Call, Completion, Upstream, GATE_TOP_LOGPROBS};
use serde_json::{json, Value};
use tandem_core::engine::{Next, Reply};
use tandem_core::Micros;

/// Where an engine cascade ended: the tier that answered, how many tiers were called, and how
/// many there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TierOutcome {
    pub answered: usize,
    pub called: usize,
    pub count: usize,
}

impl TierOutcome {
    /// The served tier's role: `small` (the cheapest), `large` (the top) or `mid`.
    pub fn role(&self) -> &'static str {
        match self.answered {
            0 => "small",
            k if k + 1 == self.count => "large",
            _ => "mid",
        }
    }
}

impl<'a> Run<'a> {
    fn engine_error(e: tandem_core::CoreError) -> GatewayError {
        GatewayError::Internal(format!("cascade engine: {e}"))
    }

    /// The most any upstream of tier `tier`'s group could cost for this call.
    fn tier_estimate(&self, tier: usize, call: &Call) -> Micros {
        self.route
            .cfg
            .tiers
            .get(tier)
            .map(|g| {
                g.members
                    .iter()
                    .filter_map(|&i| self.gw.upstreams.get(i))
                    .map(|up| up.estimate(&self.call_for(up, call)))
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }

    /// The call to tier `tier`'s upstream `up`: with log-probabilities when the gate reads them
    /// and the answer will be judged, and with the tier below's draft (S4L) when the engine
    /// hints.
    fn tier_call(
        &self,
        up: &Upstream,
        call: &Call,
        ctx: &Ctx,
        judged: bool,
        draft: Option<&str>,
    ) -> Call {
        let mut c = self.call_for(up, call);
        let reads = matches!(
            self.route.cfg.cfg.gate,
            CascadeGate::Logprob | CascadeGate::Energy | CascadeGate::Ocl
        );
        if judged && reads && up.cfg.gives_logprobs() {
            let k = ctx.asked_logprobs.unwrap_or(0).max(GATE_TOP_LOGPROBS);
            c = c
                .with("logprobs", Some(json!(true)))
                .with("top_logprobs", Some(json!(k)));
        }
        if let Some(d) = draft {
            let messages = call
                .get("messages")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            c = c.with("messages", Some(Value::Array(with_hint(&messages, d))));
        }
        c
    }

    /// Reserves `estimate` for a metered tier, durably. None: the budget refused it.
    async fn reserve_tier(
        &self,
        estimate: Micros,
    ) -> Result<Option<crate::budget::Held>, GatewayError> {
        self.asked
            .store(estimate, std::sync::atomic::Ordering::Relaxed);
        let Some(held) = self.route.budget.try_reserve(estimate, unix_now()) else {
            return Ok(None);
        };
        match held.durable().await {
            Ok(()) => Ok(Some(held)),
            Err(e) if e.is_budget_refusal() => {
                metrics::counter!("tandem_shared_budget_refusals_total", "route" => self.route.name().to_string(), "why" => e.code().unwrap_or("budget").to_string())
                    .increment(1);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Serves the request on the route's cascade of tiers. Streams the answer that ends the walk
    /// when `stream` (and it need not be judged); else returns every answer whole.
    pub async fn tiers(
        &mut self,
        ctx: &Ctx,
        call: &Call,
        stream: bool,
    ) -> Result<Result<Streaming, Done>, GatewayError> {
        let n = self.route.cfg.tiers.len();
        let top = n - 1;
        let costs: Vec<Micros> = (0..n).map(|i| self.tier_estimate(i, call)).collect();
        let top_estimate = costs[top];
        // A router reading sentence vectors finds the prompt's in its encoder's cache: encoding
        // (milliseconds of CPU) happens here, on a blocking thread, not under the engine's lock.
        if let Some(e) = self.route.cfg.embedder.clone() {
            let text = ctx.query.routing_text().to_string();
            let _ = tokio::task::spawn_blocking(move || e.embed(&text)).await;
        }
        let mut walk = self
            .engine()?
            .begin(&ctx.query, costs)
            .map_err(Self::engine_error)?;
        // Exploration picked at the entry (route-before's `both`): the top tier is called beside
        // the cheapest, not after it; its answer, attempts and reservation wait here.
        let mut early: Option<(Result<Completion, GatewayError>, u32, crate::budget::Held)> = None;
        if !ctx.learn {
            walk.set_learning(false);
        }
        let mut answers: Vec<Option<Completion>> = (0..n).map(|_| None).collect();
        let mut last_err: Option<GatewayError> = None;
        let mut capped = false;
        let mut called = 0usize;
        let mut top_failed = false;
        let two_model = self.route.cfg.is_two_model();
        // Each tier is called at most once and refused at most twice per walk; more steps than
        // that would be an engine fault: end the request rather than loop.
        let mut steps = 0usize;
        while let Next::Call {
            tier,
            metered,
            estimate,
            hint,
            last,
        } = walk.next()
        {
            steps += 1;
            if steps > 3 * n + 2 {
                return Err(GatewayError::Internal(format!(
                    "route `{}`: the cascade's walk did not end after {steps} steps",
                    self.route.name()
                )));
            }
            let ready = if tier == top { early.take() } else { None };
            let (ready, held) = match ready {
                Some((r, k, h)) => (Some((r, k)), Some(h)),
                None => (None, None),
            };
            let held = if held.is_some() {
                held
            } else if metered {
                match self.reserve_tier(estimate).await? {
                    Some(h) => Some(h),
                    None => {
                        capped = true;
                        // Exploration is the gateway's own wish to learn: when the budget
                        // refuses it, the answer in hand serves, even on a refusing route.
                        let exploring = walk.item().explored && walk.has_answer();
                        if self.refuses() && !exploring {
                            // A small model that failed keeps its own error on the two-model
                            // form, as before it ran on the engine: the budget was not the fault.
                            if let (true, false, Some(e)) =
                                (two_model, walk.has_answer(), last_err.take())
                            {
                                return Err(e);
                            }
                            return Err(self.exhausted());
                        }
                        metrics::counter!("tandem_budget_refusals_total", "route" => self.route.name().to_string(), "tier" => super::tier_name(tier))
                            .increment(1);
                        self.engine()?.refused(&mut walk);
                        continue;
                    }
                }
            } else {
                None
            };
            called += 1;
            // S4L: the deepest usable draft below goes into the top tier's prompt.
            let draft = hint
                .and_then(|_| answers[..tier].iter().rev().flatten().next())
                .map(Completion::text);
            let role = Role::Tier(tier);
            let make = |up: &Upstream| self.tier_call(up, call, ctx, !last, draft.as_deref());
            self.large_uncertain
                .store(false, std::sync::atomic::Ordering::SeqCst);
            if last && stream && ready.is_none() {
                let (r, k) = self.stream_on(role, &make).await;
                self.tried += k;
                if let Some(h) = &held {
                    self.mark(h);
                }
                match r {
                    Ok(started) => {
                        // The walk stays open until the stream is whole: then its text is the
                        // answer the policy learns from (`finish_streamed`).
                        let outcome = TierOutcome {
                            answered: tier,
                            called,
                            count: n,
                        };
                        let info = super::PlanInfo {
                            score: self.walk_score(&walk, &answers),
                            capped,
                        };
                        let draft = answers[..tier].iter_mut().rev().find_map(Option::take);
                        let role_served = if tier + 1 == n {
                            Served::Large
                        } else {
                            Served::Small
                        };
                        let mut s = self.streaming(started, held, role_served, draft, &info);
                        s.tiers = Some(outcome);
                        s.walk = Some(Box::new(walk));
                        return Ok(Ok(s));
                    }
                    Err(e) if e.is_upstream() => {
                        if let Some(h) = held {
                            h.release();
                        }
                        top_failed = tier + 1 == n;
                        self.engine()?.failed(&mut walk);
                        last_err = Some(e);
                        continue;
                    }
                    Err(e) => {
                        if let Some(h) = held {
                            h.release();
                        }
                        return Err(e);
                    }
                }
            }
            let both = tier == 0
                && walk.calls().is_empty()
                && walk.item().explored
                && walk.item().wanted == Some(tandem_core::policy::gate::Route::Both);
            let early_held = if both && early.is_none() {
                self.reserve_tier(top_estimate).await?
            } else {
                None
            };
            let was_ready = ready.is_some();
            let (r, k) = if let Some(done) = ready {
                done
            } else if let Some(h) = early_held {
                let top_make = |up: &Upstream| self.tier_call(up, call, ctx, false, None);
                let (cheap, (rt, kt)) = tokio::join!(
                    self.complete_on(role, &make),
                    self.complete_on(Role::Tier(top), &top_make)
                );
                self.mark(&h);
                early = Some((rt, kt, h));
                cheap
            } else {
                // No exploration, or the budget refused its top tier: this tier alone.
                self.complete_on(role, &make).await
            };
            self.tried += k;
            if let Some(h) = &held {
                self.mark(h);
            }
            match r {
                Ok(c) => {
                    let cost = self.cost_of(&c);
                    if let Some(h) = held {
                        h.settle(cost);
                    }
                    self.cost += cost;
                    let usable = judge(&c.draft, &ctx.tools, ctx.tool_choice.as_deref());
                    if usable != Verdict::Valid {
                        metrics::counter!("tandem_draft_rejected_total", "route" => self.route.name().to_string(), "why" => usable.name())
                            .increment(1);
                    }
                    let reply = Reply {
                        token_energies: c.token_energies.clone(),
                        usable: usable == Verdict::Valid,
                        usage: tandem_core::Usage {
                            input_tokens: c.usage.input_tokens,
                            output_tokens: c.usage.output_tokens,
                        },
                        cost,
                        compute: c.elapsed,
                        // Called beside the cheapest tier, the top one had no draft to read.
                        hinted: draft.is_some() && !was_ready,
                        ..Reply::generated(c.text(), c.token_logprobs.clone())
                    };
                    self.engine()?.answered(&mut walk, &ctx.query, reply, true);
                    answers[tier] = Some(c);
                }
                Err(e) if e.is_upstream() || matches!(e, GatewayError::DeadlineExceeded { .. }) => {
                    if let Some(h) = held {
                        h.release();
                    }
                    let deadline = matches!(e, GatewayError::DeadlineExceeded { .. });
                    tracing::warn!(
                        route = self.route.name(),
                        tier,
                        error_type = e.kind(),
                        error_code = e.code(),
                        "a tier could not answer; the cascade goes on without it"
                    );
                    if tier == 0 {
                        metrics::counter!("tandem_small_failures_total", "route" => self.route.name().to_string())
                            .increment(1);
                    }
                    top_failed = tier + 1 == n;
                    last_err = Some(e);
                    if deadline {
                        // Past the deadline nothing more is called: the deepest usable answer
                        // stands, if there is one.
                        if !walk.has_answer() {
                            return Err(self.past_deadline());
                        }
                        break;
                    }
                    self.engine()?.failed(&mut walk);
                }
                Err(e) => {
                    if let Some(h) = held {
                        h.release();
                    }
                    return Err(e);
                }
            }
        }
        if let Some((r, _, h)) = early.take() {
            // The walk ended before the top tier (past the deadline): its early answer was
            // still paid for.
            match r {
                Ok(c) => {
                    let cost = self.cost_of(&c);
                    h.settle(cost);
                    self.cost += cost;
                }
                Err(_) => h.release(),
            }
        }
        if !walk.has_answer() {
            if let (true, true, Some(Some(_))) = (two_model, capped, answers.first()) {
                // The two-model form serves its small draft, unusable as it is, when the budget
                // refused the large model: as before it ran on the engine. The gate never
                // scored it, so the walk is left unfinished and its share counts nothing.
                let info = super::PlanInfo {
                    score: Some(f32::INFINITY),
                    capped,
                };
                let small = answers[0].take();
                let mut done = self.done(small, None, &info);
                done.tiers = Some(TierOutcome {
                    answered: 0,
                    called,
                    count: n,
                });
                return Ok(Err(done));
            }
            return Err(last_err.unwrap_or_else(|| self.exhausted()));
        }
        let (served, _) = self
            .engine()?
            .finish(&mut walk, &ctx.query, |_| 0)
            .map_err(Self::engine_error)?;
        self.gw.forward_learned(self.route);
        let score = self.walk_score(&walk, &answers);
        let answered = served.tier;
        if let (true, Some(e)) = (top_failed && answered < top, &last_err) {
            // A usable answer below stands in for the top tier that failed.
            self.fall_back(e);
        }
        if answered == top && served.calls.len() > 1 {
            metrics::counter!("tandem_escalations_total", "route" => self.route.name().to_string())
                .increment(1);
        }
        let large = if answered == top {
            answers[top].take()
        } else {
            None
        };
        // The served cheap answer, or (the top served) the deepest draft below it.
        let small = if answered < top {
            answers[answered].take()
        } else {
            answers[..top].iter_mut().rev().find_map(Option::take)
        };
        let info = super::PlanInfo { score, capped };
        let mut done = self.done(small, large, &info);
        done.tiers = Some(TierOutcome {
            answered,
            called,
            count: n,
        });
        done.walk = Some(Box::new(walk));
        Ok(Err(done))
    }

    /// Ends an engine cascade's walk whose last answer was streamed: `text` is that answer once
    /// whole (the policy learns from it, unless the client said no_learn), or None when the
    /// stream did not finish (the share still counts the item; nothing is learned). Returns the
    /// finished walk, for feedback.
    pub(crate) fn finish_streamed(
        route: &crate::route::RouteState,
        ctx: &Ctx,
        mut walk: Box<tandem_core::engine::Walk>,
        text: Option<String>,
        token_logprobs: Option<Vec<f32>>,
    ) -> Option<Box<tandem_core::engine::Walk>> {
        let mut e = route.engine()?;
        if text.is_none() {
            walk.set_learning(false);
        }
        let reply = Reply::generated(text.unwrap_or_default(), token_logprobs);
        e.answered(&mut walk, &ctx.query, reply, true);
        match e.finish(&mut walk, &ctx.query, |_| 0) {
            Ok(_) => Some(walk),
            Err(err) => {
                tracing::warn!(route = route.name(), error = %err, "a streamed cascade's walk did not finish");
                None
            }
        }
    }

    /// The walk's `x-tandem-score`: on a two-model route gated on the small model's signal, the
    /// gate's score of the small answer (infinite when that answer could not serve, so was not
    /// scored; none when the small model did not answer). No one score speaks for a walk of
    /// several tiers' decisions, so other cascades report none.
    fn walk_score(
        &self,
        walk: &tandem_core::engine::Walk,
        answers: &[Option<Completion>],
    ) -> Option<f32> {
        if !self.route.cfg.is_two_model() {
            return None;
        }
        match (walk.item().wanted, answers.first()) {
            (Some(_), _) => Some(walk.item().score),
            (None, Some(Some(_))) => Some(f32::INFINITY),
            _ => None,
        }
    }

    fn engine(
        &self,
    ) -> Result<std::sync::MutexGuard<'a, tandem_core::engine::Cascade>, GatewayError> {
        self.route
            .engine()
            .ok_or_else(|| GatewayError::Internal("cascade route without its engine".into()))
    }
}
