//! The request pipeline, independent of HTTP: pick the route, decide small or large (before
//! generation, or after the small model's answer), hold the budget at every escalation, call,
//! account, and hand what was learned to the learner.

use crate::budget::Held;
use crate::config::{CascadeGate, OnExhausted, RouteKind, Validated};
use crate::error::GatewayError;
use crate::feedback::{observation, FeedbackLog, Pending, Served};
use crate::learner::{self, LearnerHandle, Msg};
use crate::openai::{
    ChatCompletion, ChatMessage, ChatRequest, Choice, Feedback, Force, OutMessage, TandemInfo,
    WireUsage,
};
use crate::persist;
use crate::route::{Counters, LearnEvent, Learned, RouteState};
use crate::upstream::{Call, Completion, Upstream};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tandem_core::money::micros_to_usd;
use tandem_core::policy::gate::Route as Pick;
use tandem_core::policy::response::agreement;
use tandem_core::policy::Observation;
use tandem_core::{Answer, Micros, Output, Query};

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub struct Gateway {
    routes: Arc<Vec<RouteState>>,
    by_name: HashMap<String, usize>,
    upstreams: Vec<Upstream>,
    feedback: Mutex<FeedbackLog>,
    api_keys: Option<HashSet<String>>,
    learner: LearnerHandle,
    learn_tx: std::sync::mpsc::Sender<Msg>,
    ids: AtomicU64,
    id_prefix: String,
}

/// A served answer with what the HTTP layer reports about it.
pub struct Reply {
    pub completion: ChatCompletion,
    /// Time spent waiting on upstreams, for the overhead histogram.
    pub upstream: Duration,
}

impl Gateway {
    /// Builds upstreams (loading in-process models), restores persisted state, starts the learner.
    pub fn start(cfg: &Validated) -> Result<Gateway, GatewayError> {
        let upstreams = Upstream::build_all(cfg)?;
        Gateway::with_upstreams(cfg, upstreams)
    }

    pub fn with_upstreams(
        cfg: &Validated,
        upstreams: Vec<Upstream>,
    ) -> Result<Gateway, GatewayError> {
        let now = unix_now();
        let routes: Vec<RouteState> = cfg
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| RouteState::new(i, r.clone(), now))
            .collect::<Result<_, _>>()?;
        let state_dir = cfg.state_dir();
        let mut masters = Vec::new();
        for r in &routes {
            let restored = match &state_dir {
                Some(d) => persist::load(d, r, now)?,
                None => None,
            };
            let m = match restored {
                Some(m) => {
                    tracing::info!(route = r.name(), "restored learned state");
                    m
                }
                None => Learned::for_route(&r.cfg)?,
            };
            masters.push(m);
        }
        let api_keys = match &cfg.server.api_keys_env {
            None => None,
            Some(var) => {
                let v = std::env::var(var).map_err(|_| {
                    GatewayError::Internal(format!(
                        "server.api_keys_env names {var}, which is not set"
                    ))
                })?;
                let keys: HashSet<String> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(str::to_string)
                    .collect();
                if keys.is_empty() {
                    return Err(GatewayError::Internal(format!("{var} holds no key")));
                }
                Some(keys)
            }
        };
        let by_name = routes
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name().to_string(), i))
            .collect();
        let routes = Arc::new(routes);
        let learner = learner::spawn(
            routes.clone(),
            masters,
            learner::LearnerConfig {
                state_dir,
                persist_every: Duration::from_secs(cfg.server.persist_interval_s.max(1)),
                publish_every: Duration::from_millis(100),
            },
        )
        .map_err(|e| GatewayError::Internal(format!("cannot start the learner: {e}")))?;
        let learn_tx = learner.sender();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Ok(Gateway {
            routes,
            by_name,
            upstreams,
            feedback: Mutex::new(FeedbackLog::new(cfg.server.feedback_window)),
            api_keys,
            learner,
            learn_tx,
            ids: AtomicU64::new(0),
            id_prefix: format!("chatcmpl-{:08x}{:08x}", unix_now() as u32, nanos),
        })
    }

    pub fn routes(&self) -> &[RouteState] {
        &self.routes
    }

    pub fn check_key(&self, presented: Option<&str>) -> Result<(), GatewayError> {
        match &self.api_keys {
            None => Ok(()),
            Some(keys) => match presented {
                Some(k) if keys.contains(k) => Ok(()),
                _ => Err(GatewayError::Unauthorized),
            },
        }
    }

    /// Applies and persists everything learned so far (used at shutdown and by tests).
    pub async fn flush(&self) -> Result<(), GatewayError> {
        self.learner.flush().await.map_err(GatewayError::Internal)
    }

    fn learn(&self, route: usize, ev: LearnEvent) {
        // The learner thread lives as long as the gateway; a send can only fail while dropping.
        let _ = self.learn_tx.send(Msg::Learn(route, Box::new(ev)));
    }

    fn upstream(&self, i: Option<usize>) -> Result<&Upstream, GatewayError> {
        i.and_then(|i| self.upstreams.get(i))
            .ok_or_else(|| GatewayError::Internal("route without its upstream".into()))
    }

    fn next_id(&self) -> String {
        format!(
            "{}{:08x}",
            self.id_prefix,
            self.ids.fetch_add(1, Ordering::Relaxed)
        )
    }

    pub async fn chat(
        &self,
        req: ChatRequest,
        force: Option<Force>,
    ) -> Result<Reply, GatewayError> {
        if req.messages.is_empty() {
            return Err(GatewayError::BadRequest(
                "`messages` must not be empty".into(),
            ));
        }
        if req.n.is_some_and(|n| n != 1) {
            return Err(GatewayError::BadRequest("only `n` = 1 is supported".into()));
        }
        let ri = *self
            .by_name
            .get(&req.model)
            .ok_or_else(|| GatewayError::UnknownRoute(req.model.clone()))?;
        let route = &self.routes[ri];
        let rc = &route.cfg.cfg;
        let overrides = req.tandem.clone().unwrap_or_default();
        let force = force.or(overrides.force);
        let learn = !overrides.no_learn;
        Counters::bump(&route.counters.requests);
        // The response id doubles as the query id: learners cache features by query id.
        let id = self.next_id();
        let query = Query {
            id: id.clone(),
            input: tandem_core::Input::Chat(req.core_messages()),
            metadata: Default::default(),
        };
        let call = Call {
            messages: req.messages.clone(),
            max_tokens: req.token_cap().unwrap_or(rc.max_tokens),
            logprobs: false,
            extra: req.extra.clone(),
        };
        let mut run = Run::new(self, route);
        let outcome = match (rc.kind, force) {
            (RouteKind::Fixed, _) | (_, Some(Force::Large)) => run.large_or_small(&call).await,
            (_, Some(Force::Small)) => run.small_only(&call).await,
            (RouteKind::RouteBefore, None) => run.route_before(&query, &call, learn).await,
            (RouteKind::Cascade, None) => run.cascade(&query, &call, learn).await,
        }?;
        let (served_role, answer) = match &outcome.large {
            Some(l) => (Served::Large, l),
            None => match &outcome.small {
                Some(s) => (Served::Small, s),
                None => return Err(GatewayError::Internal("no answer".into())),
            },
        };
        let served_up = match served_role {
            Served::Large => self.upstream(route.cfg.large)?,
            Served::Small => self.upstream(route.cfg.small)?,
        };
        let c = &route.counters;
        Counters::bump(match (&outcome.small, &outcome.large) {
            (Some(_), Some(_)) => &c.both,
            (_, Some(_)) => &c.large,
            _ => &c.small,
        });
        if outcome.capped {
            Counters::bump(&c.capped);
            metrics::counter!("tandem_budget_capped_total", "route" => rc.name.clone())
                .increment(1);
        }
        let role = match served_role {
            Served::Small => "small",
            Served::Large => "large",
        };
        metrics::counter!("tandem_requests_total", "route" => rc.name.clone(), "served" => role)
            .increment(1);
        metrics::counter!("tandem_spend_micros_total", "route" => rc.name.clone())
            .increment(outcome.cost);
        let small_answer = outcome.small.as_ref().map(|s| {
            to_answer(
                self.upstream(route.cfg.small)
                    .map(|u| u.name.as_str())
                    .unwrap_or(""),
                s,
            )
        });
        self.feedback
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id.clone(),
                Pending {
                    route: ri,
                    query,
                    small: small_answer,
                    served: served_role,
                    served_text: answer.text.clone(),
                    learn,
                },
            );
        let upstream_time = outcome.small.as_ref().map_or(Duration::ZERO, |s| s.elapsed)
            + outcome.large.as_ref().map_or(Duration::ZERO, |l| l.elapsed);
        let completion = ChatCompletion {
            id,
            object: "chat.completion".into(),
            created: unix_now(),
            model: rc.name.clone(),
            choices: vec![Choice {
                index: 0,
                message: OutMessage {
                    role: "assistant".into(),
                    content: answer.text.clone(),
                },
                finish_reason: answer.finish_reason.clone(),
            }],
            usage: WireUsage {
                prompt_tokens: answer.usage.input_tokens,
                completion_tokens: answer.usage.output_tokens,
                total_tokens: answer.usage.input_tokens + answer.usage.output_tokens,
            },
            tandem: TandemInfo {
                route: rc.name.clone(),
                tier: served_up.name.clone(),
                role: role.into(),
                escalated: outcome.small.is_some() && outcome.large.is_some(),
                score: outcome.score,
                cost_usd: micros_to_usd(outcome.cost),
                capped: outcome.capped,
            },
        };
        tracing::info!(
            route = %rc.name,
            tier = %served_up.name,
            served = role,
            score = ?outcome.score,
            capped = outcome.capped,
            cost_usd = micros_to_usd(outcome.cost),
            upstream_ms = upstream_time.as_millis() as u64,
            "chat completion"
        );
        Ok(Reply {
            completion,
            upstream: upstream_time,
        })
    }

    /// Learns from feedback on an earlier response.
    pub fn feedback(&self, fb: &Feedback) -> Result<(), GatewayError> {
        let mut log = self.feedback.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = log.take(&fb.response_id) else {
            return Err(GatewayError::UnknownResponse(fb.response_id.clone()));
        };
        match observation(fb, &p) {
            Ok(o) => {
                drop(log);
                let route = &self.routes[p.route];
                Counters::bump(&route.counters.feedback);
                metrics::counter!("tandem_feedback_total", "route" => route.name().to_string())
                    .increment(1);
                if p.learn {
                    self.learn(
                        p.route,
                        LearnEvent {
                            query: p.query,
                            small: p.small,
                            observed: o,
                        },
                    );
                }
                Ok(())
            }
            Err(e) => {
                // Bad feedback does not consume the response: the client may send it right.
                log.insert(fb.response_id.clone(), p);
                Err(e)
            }
        }
    }
}

fn to_answer(tier: &str, c: &Completion) -> Answer {
    Answer {
        tier: tier.to_string(),
        output: Output::Text {
            text: c.text.clone(),
            token_logprobs: c.token_logprobs.clone(),
        },
        usage: c.usage,
        cost: 0,
        compute: c.elapsed,
    }
}

/// The S4L hint: the small model's draft, as a system message before the conversation.
fn with_hint(messages: &[ChatMessage], draft: &str) -> Vec<ChatMessage> {
    let hint = ChatMessage {
        role: "system".into(),
        content: serde_json::Value::String(format!(
            "A smaller model drafted this answer to the user's last message. It may be wrong: check it and give your own best answer.\n---\n{draft}\n---"
        )),
        extra: Default::default(),
    };
    let mut out = Vec::with_capacity(messages.len() + 1);
    // After the client's own system messages, so theirs keep the first word.
    let split = messages.iter().take_while(|m| m.role == "system").count();
    out.extend_from_slice(&messages[..split]);
    out.push(hint);
    out.extend_from_slice(&messages[split..]);
    out
}

/// Mean of a per-token signal; None when the upstream gave none.
fn mean(v: Option<&Vec<f32>>) -> Option<f32> {
    v.filter(|v| !v.is_empty())
        .map(|v| v.iter().sum::<f32>() / v.len() as f32)
}

struct Outcome {
    small: Option<Completion>,
    large: Option<Completion>,
    score: Option<f32>,
    capped: bool,
    cost: Micros,
}

/// One request's calls and accounting.
struct Run<'a> {
    gw: &'a Gateway,
    route: &'a RouteState,
    cost: Micros,
}

impl<'a> Run<'a> {
    fn new(gw: &'a Gateway, route: &'a RouteState) -> Self {
        Run { gw, route, cost: 0 }
    }

    fn small_up(&self) -> Result<&'a Upstream, GatewayError> {
        self.gw.upstream(self.route.cfg.small)
    }

    fn large_up(&self) -> Result<&'a Upstream, GatewayError> {
        self.gw.upstream(self.route.cfg.large)
    }

    fn reserve(&self, call: &Call) -> Result<Option<Held>, GatewayError> {
        let est = self.large_up()?.estimate(&call.messages, call.max_tokens);
        Ok(self.route.budget.try_reserve(est, unix_now()))
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

    fn exhausted(&self) -> GatewayError {
        GatewayError::BudgetExhausted(self.route.name().to_string())
    }

    fn refuse_when_capped(&self) -> bool {
        self.route.cfg.cfg.on_exhausted == OnExhausted::Refuse
    }

    async fn small_only(&mut self, call: &Call) -> Result<Outcome, GatewayError> {
        if self.route.cfg.small.is_none() {
            return self.large_or_small(call).await;
        }
        let s = self.call_small(call).await?;
        Ok(self.outcome(Some(s), None, None, false))
    }

    fn outcome(
        &self,
        small: Option<Completion>,
        large: Option<Completion>,
        score: Option<f32>,
        capped: bool,
    ) -> Outcome {
        Outcome {
            small,
            large,
            score,
            capped,
            cost: self.cost,
        }
    }

    /// The large model if the budget allows, else the small one (or a 429).
    async fn large_or_small(&mut self, call: &Call) -> Result<Outcome, GatewayError> {
        match self.reserve(call)? {
            Some(held) => {
                let l = self.call_large(call, held).await?;
                Ok(self.outcome(None, Some(l), None, false))
            }
            None if self.refuse_when_capped() || self.route.cfg.small.is_none() => {
                Err(self.exhausted())
            }
            None => {
                let s = self.call_small(call).await?;
                Ok(self.outcome(Some(s), None, None, true))
            }
        }
    }

    async fn route_before(
        &mut self,
        q: &Query,
        call: &Call,
        learn: bool,
    ) -> Result<Outcome, GatewayError> {
        let model = self.route.model.load();
        let score = match (&**model, model.scratch()) {
            (Learned::Router(r), Some(mut s)) => r.score_ref(q, &mut s),
            _ => 0.0,
        };
        let d = {
            let reserve = || self.reserve(call).ok().flatten();
            self.route.gate().decide_by(score, reserve)
        };
        if d.capped && self.refuse_when_capped() {
            return Err(self.exhausted());
        }
        match (d.route, d.reservation) {
            (Pick::Strong, Some(held)) => {
                let l = self.call_large(call, held).await?;
                Ok(self.outcome(None, Some(l), Some(score), false))
            }
            (Pick::Both, Some(held)) => {
                // Exploration: both answers, the large one served, the small one graded by it.
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
                    if learn {
                        self.gw.learn(
                            self.route.index,
                            LearnEvent {
                                query: q.clone(),
                                small: None,
                                observed: Observation {
                                    weak: Some(agreement(&s.text, &l.text)),
                                    strong: Some(1.0),
                                },
                            },
                        );
                    }
                }
                Ok(self.outcome(s, Some(l), Some(score), false))
            }
            _ => {
                let s = self.call_small(call).await?;
                Ok(self.outcome(Some(s), None, Some(score), d.capped))
            }
        }
    }

    async fn cascade(
        &mut self,
        q: &Query,
        call: &Call,
        learn: bool,
    ) -> Result<Outcome, GatewayError> {
        let small_call = Call {
            logprobs: true,
            ..call.clone()
        };
        let s = self.call_small(&small_call).await?;
        let small_name = self.small_up()?.name.clone();
        let answer = to_answer(&small_name, &s);
        let gate = self.route.cfg.cfg.gate;
        let score = match gate {
            // Unknown confidence escalates: an upstream without log-probabilities cannot vouch.
            CascadeGate::Logprob => mean(s.token_logprobs.as_ref()).map_or(f32::INFINITY, |m| -m),
            CascadeGate::Energy => mean(s.token_energies.as_ref()).unwrap_or(f32::INFINITY),
            CascadeGate::Learned => {
                let model = self.route.model.load();
                match (&**model, model.scratch()) {
                    (Learned::Cascade(c), Some(mut sc)) => c.score_ref(q, &answer, &mut sc),
                    _ => 0.0,
                }
            }
        };
        let d = {
            let reserve = || self.reserve(call).ok().flatten();
            self.route.gate().decide_by(score, reserve)
        };
        if d.capped && self.refuse_when_capped() {
            return Err(self.exhausted());
        }
        let Some(held) = d.reservation.filter(|_| d.route != Pick::Weak) else {
            return Ok(self.outcome(Some(s), None, Some(score), d.capped));
        };
        let large_call = if self.route.cfg.cfg.s4l {
            Call {
                messages: with_hint(&call.messages, &s.text),
                ..call.clone()
            }
        } else {
            call.clone()
        };
        match self.call_large(&large_call, held).await {
            Ok(l) => {
                if learn {
                    self.gw.learn(
                        self.route.index,
                        LearnEvent {
                            query: q.clone(),
                            small: Some(answer),
                            observed: Observation {
                                weak: Some(agreement(&s.text, &l.text)),
                                strong: Some(1.0),
                            },
                        },
                    );
                }
                Ok(self.outcome(Some(s), Some(l), Some(score), false))
            }
            Err(e) => {
                // The small draft is a real answer: serve it rather than fail the request.
                tracing::warn!(route = self.route.name(), error = %e, "large model failed; serving the small draft");
                metrics::counter!("tandem_fallbacks_total", "route" => self.route.name().to_string()).increment(1);
                Ok(self.outcome(Some(s), None, Some(score), false))
            }
        }
    }
}
