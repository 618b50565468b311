//! The request pipeline, independent of HTTP: pick the route, decide small or large (before
//! generation, or after the small model's answer), hold the budget at every escalation, call,
//! account, and hand what was learned to the learner.

mod judge;
mod replicas;
mod run;
mod stream;

pub use judge::{judge, Verdict};
pub use stream::{sse_whole, Event, StreamReply};

use crate::chunks::for_client;
use crate::config::{RouteKind, SharedSection, Validated};
use crate::error::GatewayError;
use crate::feedback::{observation, FeedbackLog, Pending, Served};
use crate::learner::{self, LearnerHandle, Msg};
use crate::openai::{ChatRequest, Feedback, Force, TandemInfo};
use crate::persist;
use crate::route::{Counters, LearnEvent, Learned, RouteState};
use crate::shared::{RouteShare, SharedConfig, SharedStore};
use crate::upstream::{usage_json, Call, Completion, Upstream};
use run::{Done, Run};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tandem_core::money::micros_to_usd;
use tandem_core::policy::switching::StepMeta;
use tandem_core::{Answer, Output, Query};

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub struct Gateway {
    routes: Arc<Vec<RouteState>>,
    by_name: HashMap<String, usize>,
    upstreams: Vec<Upstream>,
    feedback: Arc<Mutex<FeedbackLog>>,
    api_keys: Option<HashSet<String>>,
    learner: LearnerHandle,
    learn_tx: std::sync::mpsc::Sender<Msg>,
    ids: AtomicU64,
    id_prefix: String,
    /// Counts the walks through upstream groups, so each draws its own seed.
    walks: AtomicU64,
    /// Feedback records and learning shared with other replicas (`[server.shared]`).
    replicas: Option<replicas::Replicas>,
    /// Adds spend made while Redis was away, in the background; stopped on drop.
    sync_task: Option<tokio::task::JoinHandle<()>>,
    /// `<state_dir>/.lock`, held while the gateway lives: two processes writing one state
    /// directory would overwrite each other's spend and learning.
    _state_lock: Option<std::fs::File>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(t) = &self.sync_task {
            t.abort();
        }
    }
}

/// What the HTTP layer sends back.
// One value per request, moved once: boxing a variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Reply {
    /// The whole answer as the client gets it (the upstream's body with tandem's id, the route
    /// as `model` and the `tandem` field), what tandem did, and the time spent waiting on
    /// upstreams (for the overhead histogram).
    Whole {
        body: Map<String, Value>,
        info: TandemInfo,
        upstream: Duration,
    },
    /// The served answer streams from its upstream.
    Stream(StreamReply),
}

/// Per-request context, carried to the end of a stream.
pub(crate) struct Ctx {
    pub route: usize,
    pub id: String,
    pub created: u64,
    pub query: Query,
    pub learn: bool,
    /// The tools the request offers (name → parameter schema), and its `tool_choice`.
    pub tools: BTreeMap<String, Value>,
    pub tool_choice: Option<String>,
    /// The client's own log-probability request (top-k), honoured in what it gets back.
    pub asked_logprobs: Option<u32>,
    pub include_usage: bool,
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
        let state_lock = match &state_dir {
            Some(d) => Some(lock_state_dir(d)?),
            None => None,
        };
        let shared = match &cfg.server.shared {
            Some(sh) => Some(open_shared(sh)?),
            None => None,
        };
        let upstream_names: Vec<String> = upstreams.iter().map(|u| u.name.clone()).collect();
        let mut masters = Vec::new();
        let mut restored_any = Vec::new();
        for r in &routes {
            let restored = match &state_dir {
                // A bad file stops its own route's large calls, not the gateway.
                Some(d) => match persist::load(d, r, now, &upstream_names) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!(route = r.name(), error = %e, "state file refused: the route serves with its large model's budget closed");
                        r.refuse_state(e.to_string());
                        None
                    }
                },
                None => None,
            };
            match (&shared, &cfg.server.shared) {
                // Redis holds the route's spend, durably for every replica: no local journal.
                (Some((store, _)), Some(sh)) => share_budget(store, sh, r),
                _ => {
                    if let Some(d) = &state_dir {
                        let journaled = restored.as_ref().is_some_and(|s| s.spend_journal);
                        open_journal(d, r, journaled, now);
                    }
                }
            }
            restored_any.push(restored.is_some());
            let m = match restored {
                Some(s) => {
                    tracing::info!(route = r.name(), "restored learned state");
                    s.learned
                }
                None => {
                    if let Some(p) = r.cfg.prior.as_deref() {
                        let on: Vec<String> = p
                            .info
                            .trained_on
                            .iter()
                            .map(|t| format!("{} ({} items)", t.file, t.items))
                            .collect();
                        tracing::info!(
                            route = r.name(),
                            trained_on = %on.join(", "),
                            encoder = p.info.embedder.as_deref().unwrap_or("none"),
                            "no saved state: starting from the route's prior"
                        );
                    }
                    Learned::for_route(&r.cfg)?
                }
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
                for k in &keys {
                    crate::scrub::register_secret(k);
                }
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
                upstreams: upstream_names,
            },
        )
        .map_err(|e| GatewayError::Internal(format!("cannot start the learner: {e}")))?;
        let learn_tx = learner.sender();
        let sync_task = shared.as_ref().map(|_| spawn_sync(routes.clone()));
        let replicas = match (shared, &cfg.server.shared) {
            (Some((store, origin)), Some(sh)) => Some(replicas::Replicas::start(
                store,
                origin,
                Duration::from_secs(sh.feedback_ttl_s),
                Duration::from_millis(sh.op_timeout_ms),
                routes.clone(),
                restored_any,
                learn_tx.clone(),
            )),
            _ => None,
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Ok(Gateway {
            routes,
            by_name,
            upstreams,
            feedback: Arc::new(Mutex::new(FeedbackLog::new(cfg.server.feedback_window))),
            api_keys,
            learner,
            learn_tx,
            ids: AtomicU64::new(0),
            walks: AtomicU64::new(0),
            replicas,
            sync_task,
            _state_lock: state_lock,
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

    /// Applies and persists everything learned so far, and adds spend made while Redis was
    /// away to Redis if it answers (used at shutdown and by tests).
    pub async fn flush(&self) -> Result<(), GatewayError> {
        for r in self.routes.iter() {
            if let Some(s) = r.budget.shared() {
                s.sync().await;
            }
        }
        self.learner.flush().await.map_err(GatewayError::Internal)
    }

    /// Hands the lessons `route`'s engine gave its learned scorer (a route-before router, a
    /// learned cascade scorer) to the learner and the other replicas. Returns how many.
    pub(crate) fn forward_learned(&self, route: &RouteState) -> usize {
        let lessons = route.shared.outbox.take();
        let n = lessons.len();
        for ev in lessons {
            self.learn(route.index, ev);
        }
        n
    }

    /// Hands what a request or feedback taught to the learner, and to the other replicas.
    pub(crate) fn learn(&self, route: usize, ev: LearnEvent) {
        if let Some(r) = &self.replicas {
            r.learned(route, &ev);
        }
        // The learner thread lives as long as the gateway; a send can only fail while dropping.
        let _ = self.learn_tx.send(Msg::Learn(route, Box::new(ev)));
    }

    pub(crate) fn upstream(&self, i: Option<usize>) -> Result<&Upstream, GatewayError> {
        i.and_then(|i| self.upstreams.get(i))
            .ok_or_else(|| GatewayError::Internal("route without its upstream".into()))
    }

    /// The seed of one walk through a group (its weighted draw and backoff jitter): the route's
    /// seed and a counter, so a run with the same requests in the same order draws the same.
    pub(crate) fn next_seed(&self, route: &RouteState) -> u64 {
        let n = self.walks.fetch_add(1, Ordering::Relaxed);
        route.cfg.cfg.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// Every upstream, in config order.
    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    /// `GET /health`: `status` is `ok`, or `degraded` when an operator must act — a route whose
    /// state file was refused (it serves with its large model closed), a route's model whose
    /// every upstream has its circuit breaker open, or (`[server.shared]`) a Redis that failed
    /// its last operation; `shared` then names the Redis and this replica. `upstreams` gives each upstream's breaker
    /// (`closed`, `open`, `half_open`) and, with a concurrency limit, its calls in flight.
    pub fn health(&self) -> Value {
        let upstreams: Map<String, Value> = self
            .upstreams
            .iter()
            .map(|u| {
                let mut v = json!({"breaker": u.health.state().name()});
                if let Some(n) = u.health.in_flight() {
                    v["in_flight"] = json!(n);
                }
                (u.name.clone(), v)
            })
            .collect();
        let mut routes = Map::new();
        for r in self.routes.iter() {
            let mut why = Map::new();
            if let Some(s) = r.refused_state() {
                why.insert("state_refused".into(), json!(s));
            }
            for (role, g) in [("small", &r.cfg.small), ("large", &r.cfg.large)] {
                let down = g.as_ref().is_some_and(|g| {
                    g.members.iter().all(|&i| {
                        self.upstreams.get(i).is_some_and(|u| {
                            u.health.state() == crate::resilience::BreakerState::Open
                        })
                    })
                });
                if down {
                    why.insert(
                        format!("{role}_unavailable"),
                        json!("every upstream's circuit breaker is open"),
                    );
                }
            }
            if !why.is_empty() {
                routes.insert(r.name().to_string(), Value::Object(why));
            }
        }
        let redis_down = self.replicas.as_ref().is_some_and(|r| r.store().is_down());
        let mut out = json!({
            "status": if routes.is_empty() && !redis_down { "ok" } else { "degraded" },
            "upstreams": upstreams,
        });
        if !routes.is_empty() {
            out["routes"] = Value::Object(routes);
        }
        if let Some(r) = &self.replicas {
            // Down: the routes spend as `on_redis_down` says, and feedback stays local.
            out["shared"] = json!({
                "redis": r.store().url(),
                "replica": r.origin(),
                "reachable": !redis_down,
            });
        }
        out
    }

    fn next_id(&self) -> String {
        format!(
            "{}{:08x}",
            self.id_prefix,
            self.ids.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Serves one chat request: the decision, the calls, the accounting. Streams when the client
    /// asked and the served answer need not be judged before its first byte.
    pub async fn chat(
        self: &Arc<Self>,
        req: ChatRequest,
        force: Option<Force>,
    ) -> Result<Reply, GatewayError> {
        if req.messages.is_empty() {
            return Err(GatewayError::BadRequest(
                "`messages` must not be empty".into(),
            ));
        }
        let ri = *self
            .by_name
            .get(&req.model)
            .ok_or_else(|| GatewayError::UnknownRoute(req.model.clone()))?;
        let route = &self.routes[ri];
        let kind = route.cfg.cfg.kind;
        if req.n != 1 && matches!(kind, RouteKind::Cascade | RouteKind::Switching) {
            return Err(GatewayError::BadRequest(format!(
                "`n` = {} is not supported on route `{}`: a {} route judges one answer",
                req.n,
                route.name(),
                if kind == RouteKind::Cascade {
                    "cascade"
                } else {
                    "switching"
                }
            )));
        }
        let overrides = req.tandem.clone().unwrap_or_default();
        let force = force.or(overrides.force);
        Counters::bump(&route.counters.requests);
        // The response id doubles as the query id: learners cache features by query id.
        let id = self.next_id();
        let tools = req.tools();
        let tool_choice = req.tool_choice();
        let mut metadata = BTreeMap::new();
        if !tools.is_empty() {
            // Routers see that tools are offered, and which.
            metadata.insert(
                "tools".to_string(),
                tools.keys().cloned().collect::<Vec<_>>().join(" "),
            );
        }
        if let Some(c) = &tool_choice {
            metadata.insert("tool_choice".to_string(), c.clone());
        }
        if let (RouteKind::Switching, Some(episode)) = (kind, &overrides.episode) {
            // The switching policy reads the step from the query; a request that asks not to be
            // learned from is decided greedily and its episode teaches nothing.
            StepMeta {
                episode: episode.clone(),
                greedy: overrides.no_learn,
                no_learn: overrides.no_learn,
                ..StepMeta::default()
            }
            .write(&mut metadata);
        }
        let ctx = Ctx {
            route: ri,
            created: unix_now(),
            query: Query {
                id: id.clone(),
                input: tandem_core::Input::Chat(req.core_messages()),
                metadata,
            },
            id,
            learn: !overrides.no_learn,
            tools,
            tool_choice,
            asked_logprobs: req.logprobs,
            include_usage: req.include_usage,
        };
        let call = Call::new(req.body.clone());
        let mut run = Run::new(self, route);
        // A route whose policy decides (a cascade, route-before) runs on the core's engine,
        // call by call.
        if route.engine.is_some()
            && matches!(kind, RouteKind::Cascade | RouteKind::RouteBefore)
            && force.is_none()
        {
            let done = match run.tiers(&ctx, &call, req.stream).await {
                Ok(Ok(s)) => return Ok(Reply::Stream(StreamReply::new(self.clone(), ctx, s))),
                Ok(Err(done)) => done,
                Err(e) => {
                    // Tiers called before the error were paid for: the spend still counts.
                    if run.cost > 0 {
                        metrics::counter!("tandem_spend_micros_total", "route" => route.name().to_string())
                            .increment(run.cost);
                    }
                    return Err(e);
                }
            };
            return self.whole_reply(&ctx, done);
        }
        let plan = match (kind, force) {
            (RouteKind::Fixed, _) | (_, Some(Force::Large)) => run.plan_large(&call)?,
            (_, Some(Force::Small)) => run.plan_small(&call)?,
            (RouteKind::RouteBefore | RouteKind::Cascade, None) => {
                return Err(GatewayError::Internal(format!(
                    "route `{}` decides on the engine but has none",
                    route.name()
                )))
            }
            (RouteKind::Switching, None) => {
                let episode = overrides.episode.as_deref().ok_or_else(|| {
                    GatewayError::BadRequest(format!(
                        "route `{}` is a switching route: each request names its episode \
                         (header x-tandem-episode or `tandem.episode`)",
                        route.name()
                    ))
                })?;
                if episode.is_empty() || episode.len() > 256 {
                    return Err(GatewayError::BadRequest(
                        "`tandem.episode` must be 1 to 256 characters".into(),
                    ));
                }
                run.plan_switching(&ctx, &call)?
            }
        };
        let plan = run.confirm(plan).await?;
        // A forced request on a route of tiers still says which tier served and how many
        // were called (the cheapest, the top, or both when the cheapest failed).
        let count = route.engine.as_ref().map(|_| route.cfg.tiers.len());
        let outcome = |served: Served, called: usize| {
            count.map(|n| run::TierOutcome {
                answered: if served == Served::Large { n - 1 } else { 0 },
                called,
                count: n,
            })
        };
        let mut done = if req.stream {
            match run.streamed(&call, plan).await? {
                Ok(mut s) => {
                    s.tiers = outcome(s.served, run.models_called());
                    return Ok(Reply::Stream(StreamReply::new(self.clone(), ctx, s)));
                }
                Err(done) => done,
            }
        } else {
            run.whole(&call, plan).await?
        };
        done.tiers = outcome(done.served, run.models_called());
        self.whole_reply(&ctx, done)
    }

    fn whole_reply(&self, ctx: &Ctx, done: Done) -> Result<Reply, GatewayError> {
        let upstream = done.small.as_ref().map_or(Duration::ZERO, |s| s.elapsed)
            + done.large.as_ref().map_or(Duration::ZERO, |l| l.elapsed);
        let (body, info) = self.record(ctx, done)?;
        Ok(Reply::Whole {
            body,
            info,
            upstream,
        })
    }

    /// Counters, metrics and the feedback record of a finished request; the body the client gets
    /// (the served upstream's whole answer with tandem's id, the route as `model`, log-probabilities
    /// as asked, usage — estimated when the upstream gave none — and the `tandem` field).
    fn record(
        &self,
        ctx: &Ctx,
        done: Done,
    ) -> Result<(Map<String, Value>, TandemInfo), GatewayError> {
        let route = &self.routes[ctx.route];
        let rc = &route.cfg.cfg;
        let answer = match done.served {
            Served::Large => done.large.as_ref(),
            Served::Small => done.small.as_ref(),
        };
        let answer = answer.ok_or_else(|| GatewayError::Internal("no answer to serve".into()))?;
        let up = self.upstream(Some(answer.by))?;
        let c = &route.counters;
        Counters::bump(match (&done.small, &done.large) {
            (Some(_), Some(_)) => &c.both,
            (_, Some(_)) => &c.large,
            _ => &c.small,
        });
        if done.capped {
            Counters::bump(&c.capped);
            metrics::counter!("tandem_budget_capped_total", "route" => rc.name.clone())
                .increment(1);
        }
        let role = match (done.tiers, done.served) {
            (Some(t), _) => t.role(),
            (None, Served::Small) => "small",
            (None, Served::Large) => "large",
        };
        metrics::counter!("tandem_requests_total", "route" => rc.name.clone(), "served" => role)
            .increment(1);
        metrics::counter!("tandem_spend_micros_total", "route" => rc.name.clone())
            .increment(done.cost);
        let small_answer = done
            .small
            .as_ref()
            .and_then(|s| Some(to_answer(&self.upstreams.get(s.by)?.name, s)));
        let pending = Pending {
            route: ctx.route,
            query: ctx.query.clone(),
            small: small_answer,
            served: done.served,
            served_text: answer.text(),
            learn: ctx.learn,
            walk: done.walk,
        };
        match &self.replicas {
            Some(r) => r.keep(ctx.id.clone(), pending, &rc.name, &self.feedback),
            None => self
                .feedback
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ctx.id.clone(), pending),
        }
        let info = TandemInfo {
            route: rc.name.clone(),
            tier: up.name.clone(),
            role: role.into(),
            // A cascade of tiers escalated when it called more than the tier it entered at.
            escalated: done
                .tiers
                .map_or(done.small.is_some() && done.large.is_some(), |t| {
                    t.called > 1
                }),
            score: done.score,
            cost_usd: micros_to_usd(done.cost),
            capped: done.capped,
            usage_estimated: answer.usage_estimated,
            tried: done.tried,
            tier_index: done.tiers.map(|t| t.answered),
            tiers_called: done.tiers.map(|t| t.called),
        };
        let (estimated, usage) = (answer.usage_estimated, answer.usage);
        // The served answer's body is moved out, not copied: `done` ends here.
        let served = match done.served {
            Served::Large => done.large,
            Served::Small => done.small,
        };
        let mut body = served.map(|c| c.body).unwrap_or_default();
        for_client(
            &mut body,
            &ctx.id,
            ctx.created,
            &rc.name,
            ctx.asked_logprobs,
        );
        if estimated || !body.get("usage").is_some_and(Value::is_object) {
            body.insert("usage".into(), usage_json(usage));
        }
        body.insert(
            "tandem".into(),
            serde_json::to_value(&info).unwrap_or(Value::Null),
        );
        Ok((body, info))
    }

    /// Rewards a step of an episode on a switching route; `done` ends it and the controller
    /// learns from it.
    fn episode_feedback(&self, episode: &str, fb: &Feedback) -> Result<(), GatewayError> {
        let (route, c) = self
            .routes
            .iter()
            .find_map(|r| r.switch().filter(|c| c.is_open(episode)).map(|c| (r, c)))
            .ok_or_else(|| {
                GatewayError::NotFound(format!(
                    "episode `{episode}` has no open step on any switching route"
                ))
            })?;
        if let Some(r) = fb.reward {
            c.reward(episode, r as f32)
                .map_err(|e| GatewayError::InvalidParam {
                    param: "reward",
                    message: format!("`reward`: {e}"),
                })?;
        }
        if fb.done {
            c.end_episode(episode);
        }
        Counters::bump(&route.counters.feedback);
        metrics::counter!("tandem_feedback_total", "route" => route.name().to_string())
            .increment(1);
        Ok(())
    }

    /// Learns from feedback on an earlier response, or on an episode of a switching route.
    /// With `[server.shared]`, the response may have been served by another replica: its
    /// record is taken from Redis (once for all replicas), else from this replica's log.
    pub async fn feedback(&self, fb: &Feedback) -> Result<(), GatewayError> {
        let response_id = match (&fb.response_id, &fb.episode_id) {
            (None, Some(ep)) => {
                let given = [
                    ("score", fb.score.is_some()),
                    ("correct", fb.correct.is_some()),
                    ("reference", fb.reference.is_some()),
                ];
                if let Some((param, _)) = given.into_iter().find(|(_, g)| *g) {
                    return Err(GatewayError::InvalidParam {
                        param,
                        message: "episode feedback takes `reward` and `done`, not `score`, `correct` or `reference`".into(),
                    });
                }
                if fb.reward.is_none() && !fb.done {
                    return Err(GatewayError::BadRequest(
                        "episode feedback needs `reward` or `done`".into(),
                    ));
                }
                return self.episode_feedback(ep, fb);
            }
            (Some(id), None) => {
                if fb.reward.is_some() || fb.done {
                    return Err(GatewayError::InvalidParam {
                        param: if fb.reward.is_some() {
                            "reward"
                        } else {
                            "done"
                        },
                        message: "`reward` and `done` go with `episode_id`".into(),
                    });
                }
                id
            }
            _ => {
                return Err(GatewayError::BadRequest(
                    "feedback names exactly one of `response_id` and `episode_id`".into(),
                ))
            }
        };
        let (p, shared) = self.take_record(response_id).await?;
        match observation(fb, &p) {
            Ok(o) => {
                let route = &self.routes[p.route];
                Counters::bump(&route.counters.feedback);
                metrics::counter!("tandem_feedback_total", "route" => route.name().to_string())
                    .increment(1);
                if let (true, Some(walk), Some(mut engine)) = (p.learn, &p.walk, route.engine()) {
                    // An engine cascade's policy learns each revealed tier's outcome.
                    let n = engine.tiers();
                    let observed = crate::feedback::tier_outcomes(fb, &o, walk, n);
                    engine.learn_outcomes(walk, &p.query, &observed);
                    drop(engine);
                    // A learned scorer's lessons go to the learner, which counts them; a policy
                    // the engine holds whole learned here.
                    if self.forward_learned(route) == 0 {
                        Counters::bump(&route.counters.learned);
                    }
                } else if p.learn {
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
                match (&self.replicas, shared) {
                    (Some(r), true) => {
                        let name = self.routes[p.route].name().to_string();
                        r.put_back(response_id.clone(), p, &name, &self.feedback);
                    }
                    _ => self
                        .feedback
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(response_id.clone(), p),
                }
                Err(e)
            }
        }
    }
}

impl Gateway {
    /// Takes response `id`'s feedback record: from Redis (true: shared), else from this
    /// replica's log. With `[server.shared]`, a record is written to Redis off the request path,
    /// so feedback sent right after its response — to this replica or another — may come
    /// before it: a miss is asked again, briefly, until the write has landed or failed (its
    /// record then in the serving replica's log). Only a miss (an unknown, expired or answered
    /// response) waits that long.
    async fn take_record(&self, id: &str) -> Result<(Pending, bool), GatewayError> {
        let take_local = || {
            self.feedback
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(id)
        };
        let Some(r) = &self.replicas else {
            return take_local()
                .map(|p| (p, false))
                .ok_or_else(|| GatewayError::UnknownResponse(id.to_string()));
        };
        let deadline = tokio::time::Instant::now() + r.write_grace();
        let mut pause = Duration::from_millis(2);
        let mut warned = false;
        loop {
            match r.take(id, |n| self.by_name.get(n).copied()).await {
                Ok(Some(p)) => return Ok((p, true)),
                Ok(None) => {}
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "feedback: Redis not asked; this replica's records only");
                        warned = true;
                    }
                }
            }
            if let Some(p) = take_local() {
                return Ok((p, false));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(GatewayError::UnknownResponse(id.to_string()));
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

/// Opens the store replicas share (`[server.shared]`); Redis need not be up yet — until it
/// answers, each route does what `on_redis_down` says.
/// Takes `dir`'s lock file (creating the directory), or says which directory is in use.
fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, GatewayError> {
    let fail = |what: String| {
        GatewayError::Internal(format!("server.state_dir {}: {what}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create: {e}")))?;
    let path = dir.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| fail(format!("cannot open {}: {e}", path.display())))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(fail(
            "is in use by another tandem process; give each replica its own state_dir".into(),
        )),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(fail(format!("cannot lock {}: {e}", path.display())))
        }
    }
}

/// Returns the store and this replica's name in it.
fn open_shared(sh: &SharedSection) -> Result<(Arc<SharedStore>, String), GatewayError> {
    let url = match (&sh.redis_url, &sh.redis_url_env) {
        (Some(u), _) => u.clone(),
        (None, Some(var)) => std::env::var(var).map_err(|_| {
            GatewayError::Internal(format!(
                "server.shared.redis_url_env names {var}, which is not set"
            ))
        })?,
        (None, None) => return Err(GatewayError::Internal("server.shared: no redis_url".into())),
    };
    let mut c = SharedConfig::new(url, sh.prefix.clone());
    c.op_timeout = Duration::from_millis(sh.op_timeout_ms);
    let origin = match &sh.replica_id {
        Some(r) => r.clone(),
        None => format!(
            "{}-{}",
            std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty() && !h.contains(char::is_whitespace))
                .unwrap_or_else(|| "replica".into()),
            std::process::id()
        ),
    };
    // Ids in Redis stay unique even when two replicas are configured with one name.
    let origin = format!("{origin}.{:08x}", rand::random::<u32>());
    c.replica_id = Some(origin.clone());
    let store = SharedStore::new(c).map_err(|e| GatewayError::Internal(e.to_string()))?;
    tracing::info!(redis = store.url(), prefix = %sh.prefix, on_redis_down = ?sh.on_redis_down, "replicas share budgets, feedback and learning through Redis");
    Ok((Arc::new(store), origin))
}

/// Links a capped route's budget to the shared store (unless its state was refused: it stays
/// closed).
fn share_budget(store: &Arc<SharedStore>, sh: &SharedSection, r: &RouteState) {
    if !r.budget.is_capped() || r.refused_state().is_some() {
        return;
    }
    let link = RouteShare::new(
        store.clone(),
        r.name(),
        r.budget.limits(),
        r.budget.window_s(),
        Duration::from_secs(sh.hold_s),
        sh.on_redis_down,
    );
    let _ = r.budget.attach_shared(Arc::new(link));
}

/// Every second, adds what routes spent on their own while Redis was away, once it answers.
fn spawn_sync(routes: Arc<Vec<RouteState>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for r in routes.iter() {
                if let Some(s) = r.budget.shared().filter(|s| s.has_unsynced()) {
                    s.sync().await;
                }
            }
        }
    })
}

/// Opens a capped route's spend journal in `dir` (unless its state was refused: its files are
/// then left alone) and restores its spend from it; a journal that cannot be trusted or written
/// refuses the route's state like a bad state file. `journaled`: the state file says the journal
/// exists.
fn open_journal(dir: &std::path::Path, r: &RouteState, journaled: bool, now: u64) {
    if !r.budget.is_capped() || r.refused_state().is_some() {
        return;
    }
    let opened = crate::journal::Journal::open(
        dir,
        r.name(),
        r.budget.window_s(),
        r.budget.spent(),
        journaled,
        now,
    );
    match opened {
        Ok((j, o)) => {
            if let Err(e) = r.budget.restore(o.spent, now) {
                r.refuse_state(format!("{}: {e}", j.path().display()));
                return;
            }
            if o.folded > 0 || o.torn > 0 {
                tracing::warn!(
                    route = r.name(),
                    open_reservations = o.folded,
                    torn_bytes = o.torn,
                    "spend journal: reservations of the last run that never settled count at their estimate"
                );
            }
            let _ = r.budget.attach_journal(j);
        }
        Err(e) => {
            tracing::error!(route = r.name(), error = %e, "spend journal refused: the route serves with its large model's budget closed");
            r.refuse_state(e.to_string());
        }
    }
}

pub(crate) fn to_answer(tier: &str, c: &Completion) -> Answer {
    Answer {
        tier: tier.to_string(),
        output: Output::Text {
            text: c.text(),
            token_logprobs: c.token_logprobs.clone(),
        },
        usage: c.usage,
        cost: 0,
        compute: c.elapsed,
    }
}

/// The S4L hint: the small model's draft, as a system message before the conversation.
pub(crate) fn with_hint(messages: &[Value], draft: &str) -> Vec<Value> {
    let hint = json!({
        "role": "system",
        "content": format!(
            "A smaller model drafted this answer to the user's last message. It may be wrong: check it and give your own best answer.\n---\n{draft}\n---"
        ),
    });
    let mut out = Vec::with_capacity(messages.len() + 1);
    // After the client's own system messages (and developer messages), so theirs keep the
    // first word.
    let split = messages
        .iter()
        .take_while(|m| matches!(m["role"].as_str(), Some("system" | "developer")))
        .count();
    out.extend_from_slice(&messages[..split]);
    out.push(hint);
    out.extend_from_slice(&messages[split..]);
    out
}
