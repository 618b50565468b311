//! One route's live state: the learned model (read lock-free by requests, replaced whole by the
//! learner), the engine whose policy decides (and whose gate holds the share), the budget and
//! the counters.

use crate::budget::WindowBudget;
use crate::config::{CascadeGate, Route as RouteCfg, RouteKind};
use crate::error::GatewayError;
use crate::snapshot::{Shared, SnapshotCascade, SnapshotRouter};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use tandem_core::engine::Cascade;
use tandem_core::features::Scratch;
use tandem_core::londi::SwitchConfig;
use tandem_core::policy::cascade::{CascadeConfig, ResponseCascade};
use tandem_core::policy::gate::{Gate, GateConfig};
use tandem_core::policy::gated::{Gated, Scorer, Signal};
use tandem_core::policy::ocl::{DeferralConfig, Ocl};
use tandem_core::policy::random::RandomDeferral;
use tandem_core::policy::router::{GainRouter, RouterConfig};
use tandem_core::policy::shunt::{self, ConfidenceShunt};
use tandem_core::policy::switching::{SwitchHandle, Switching};
use tandem_core::policy::teaching::{S4l, Teaching};
use tandem_core::policy::{energy, Deferral};
use tandem_core::{Answer, Query};

/// Feature size of the server's learners: 2^18 weights per class keeps a snapshot copy cheap.
pub const LEARNER_BITS: u32 = 18;

/// What a route learns.
#[derive(Clone)]
pub enum Learned {
    /// Fixed routes and cascades gated on log-probabilities or energy learn nothing but the
    /// threshold (in the gate).
    Nothing,
    Router(Box<GainRouter>),
    Cascade(Box<ResponseCascade>),
}

impl Learned {
    /// A route's model before it learned anything here: its prior's, else a fresh one.
    pub fn for_route(r: &RouteCfg) -> Result<Learned, GatewayError> {
        let internal = |e: tandem_core::CoreError| GatewayError::Internal(e.to_string());
        let prior = r.prior.as_deref();
        Ok(match (r.cfg.kind, r.cfg.gate) {
            (RouteKind::RouteBefore, _) if prior.is_some_and(|p| p.router.is_some()) => {
                Learned::Router(Box::new(attach_encoder(
                    prior
                        .and_then(|p| p.router.clone())
                        .ok_or_else(|| GatewayError::Internal("prior without router".into()))?,
                    r,
                )?))
            }
            (RouteKind::Cascade, CascadeGate::Learned)
                if prior.is_some_and(|p| p.cascade.is_some()) =>
            {
                Learned::Cascade(Box::new(prior.and_then(|p| p.cascade.clone()).ok_or_else(
                    || GatewayError::Internal("prior without cascade scorer".into()),
                )?))
            }
            (RouteKind::RouteBefore, _) => Learned::Router(Box::new(attach_encoder(
                GainRouter::new(router_config(r.embedder.as_deref())).map_err(internal)?,
                r,
            )?)),
            (RouteKind::Cascade, CascadeGate::Learned) => Learned::Cascade(Box::new(
                ResponseCascade::new(cascade_config()).map_err(internal)?,
            )),
            _ => Learned::Nothing,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Learned::Nothing => "nothing",
            Learned::Router(_) => "router",
            Learned::Cascade(_) => "cascade",
        }
    }

    pub fn scratch(&self) -> Option<Scratch> {
        match self {
            Learned::Nothing => None,
            Learned::Router(r) => r.scratch().ok(),
            Learned::Cascade(c) => c.scratch().ok(),
        }
    }
}

/// A cascade or route-before route's engine: its tiers, the deferral policy its gate names (the
/// core's, one file each: DS+'s shunt held to a share or at a fixed threshold for `logprob`,
/// E-LANG's energy, OCL, random; the two-model gates — a route-before router, a learned or
/// signal cascade scorer — as core's `Gated`), S4L when asked, and every step up metered by the
/// route's budget. `shared`: the route's learned model, which a `Gated` scorer reads.
pub fn engine_cascade(
    r: &RouteCfg,
    shared: &crate::snapshot::Shared,
) -> Result<Cascade, tandem_core::CoreError> {
    let c = &r.cfg;
    let n = r.tiers.len();
    let share = || {
        c.target_share.ok_or_else(|| {
            tandem_core::CoreError::config("target_share", "(missing)", "the gate holds a share")
        })
    };
    let policy: Box<dyn Deferral> = match c.gate {
        // A route-before router picks the entry tier from the prompt alone, under the route's
        // gate; it learns from exploration's revealed pairs and from feedback.
        _ if c.kind == crate::config::RouteKind::RouteBefore => {
            let router: Box<dyn tandem_core::policy::RouteScorer> =
                Box::new(SnapshotRouter::new(shared.clone()));
            // Weighed by the large call's price for the prompt, when the route asks.
            let router = match (c.cost_weight.filter(|&w| w > 0.0), r.large_price) {
                (Some(w), Some(price)) => Box::new(tandem_core::policy::cost::CostAware::new(
                    router,
                    price,
                    u64::from(c.max_tokens.unwrap_or(256)),
                    w,
                )),
                _ => router,
            };
            Box::new(Gated::new(Scorer::Route(router), route_gate(c)?).learning_from_top())
        }
        // The two-model learned gate scores the small answer's text (RouteLLM-style cascade
        // scorer), and learns from every escalation's large answer and from feedback.
        CascadeGate::Learned if r.is_two_model() => Box::new(
            Gated::new(
                Scorer::Cascade(Box::new(SnapshotCascade::new(shared.clone()))),
                route_gate(c)?,
            )
            .learning_from_top(),
        ),
        // The two-model form keeps the two-model gate: the small answer's score (−mean
        // log-probability, or mean token energy) held to the share (window 500) or against the
        // fixed threshold, with its exploration — the same decisions, draw for draw.
        CascadeGate::Logprob | CascadeGate::Energy if r.is_two_model() => {
            let signal = match c.gate {
                CascadeGate::Energy => Signal::MeanEnergy,
                _ => Signal::MeanLogprob,
            };
            Box::new(Gated::new(Scorer::Signal(signal), route_gate(c)?))
        }
        CascadeGate::Logprob => match (c.target_share, c.threshold) {
            (Some(t), _) => Box::new(shunt::max_prob_gate(t, c.seed)?),
            // The two-model gate escalates when −mean log-probability exceeds the threshold: the
            // same as a confidence (geometric mean token probability) below exp(−threshold).
            (None, Some(th)) => Box::new(ConfidenceShunt::new(vec![(-th).exp(); n - 1])),
            (None, None) => Box::new(shunt::max_prob_gate(share()?, c.seed)?),
        },
        CascadeGate::Energy => Box::new(energy::energy_gate(share()?, 1.0, c.seed)?),
        // The gateway pays for every call: only the tier that will answer is called.
        CascadeGate::Random => {
            Box::new(RandomDeferral::new(share()?, c.seed).calling_only_what_answers())
        }
        CascadeGate::Ocl | CascadeGate::Learned => Box::new(Ocl::new(
            n - 1,
            DeferralConfig {
                target_top_share: c.target_share,
                explore: c.explore,
                text_features: true,
                seed: c.seed,
                ..DeferralConfig::default()
            },
            1.0,
        )?),
    };
    let teaching = Teaching {
        s4l: if c.s4l { S4l::Soft } else { S4l::Off },
        ..Teaching::default()
    };
    let mut metered = vec![true; n];
    metered[0] = false;
    Cascade::new(n, policy, teaching)?.with_metered(metered)
}

/// A two-model route's gate: its share held over the last 500 scores, or its fixed threshold,
/// with its exploration; fixed routes never ask theirs.
pub fn route_gate(c: &crate::config::RouteConfig) -> Result<Gate, tandem_core::CoreError> {
    match (c.target_share, c.threshold) {
        (Some(t), _) => Gate::new(GateConfig {
            target_share: t,
            explore: c.explore,
            window: 500,
            seed: c.seed,
        }),
        (None, Some(th)) => Gate::fixed(th, c.explore, c.seed),
        (None, None) => Gate::fixed(f32::INFINITY, 0.0, c.seed),
    }
}

/// A switching route's engine: two tiers (small, large) and LONDI's switching policy, which
/// picks the entry tier per step of an episode; the handle takes the episodes' rewards and
/// ends, and the controller's snapshots.
pub fn switching_cascade(r: &RouteCfg) -> Result<(Cascade, SwitchHandle), tandem_core::CoreError> {
    let policy = Switching::new(switch_config(r))?;
    let handle = policy.handle();
    Ok((
        Cascade::new(2, Box::new(policy), Teaching::default())?,
        handle,
    ))
}

/// A switching route's controller settings; its seed is the route's.
pub fn switch_config(r: &RouteCfg) -> SwitchConfig {
    r.cfg.switching.clone().unwrap_or(SwitchConfig {
        seed: r.cfg.seed,
        ..SwitchConfig::default()
    })
}

/// A gateway router's settings: the learners' size, and when the route reads an encoder's
/// vectors, the settings for them.
pub fn router_config(embedder: Option<&dyn tandem_core::embed::Embedder>) -> RouterConfig {
    let c = RouterConfig {
        bits: LEARNER_BITS,
        ..RouterConfig::default()
    };
    match embedder {
        Some(e) => c.with_embeddings(e.dim()),
        None => c,
    }
}

/// A route-before router as the route runs it: `r`, its encoder attached when it has one.
pub fn attach_encoder(r: GainRouter, route: &RouteCfg) -> Result<GainRouter, GatewayError> {
    match &route.embedder {
        Some(e) if r.config().reads_embeddings() => r
            .with_embedder(e.clone())
            .map_err(|e| GatewayError::Internal(e.to_string())),
        _ => Ok(r),
    }
}

pub fn cascade_config() -> CascadeConfig {
    CascadeConfig {
        bits: LEARNER_BITS,
        ..CascadeConfig::default()
    }
}

/// What a request taught, sent to the route's learner off the request path.
pub struct LearnEvent {
    pub query: Query,
    /// The small model's answer (cascade routes learn from it).
    pub small: Option<Answer>,
    pub observed: tandem_core::policy::Observation,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    pub requests: AtomicU64,
    pub small: AtomicU64,
    pub large: AtomicU64,
    /// Both models were called (exploration, or a cascade's escalation).
    pub both: AtomicU64,
    /// The large model was wanted but the budget refused it.
    pub capped: AtomicU64,
    pub feedback: AtomicU64,
    pub learned: AtomicU64,
}

impl Counters {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

pub struct RouteState {
    pub index: usize,
    pub cfg: RouteCfg,
    /// The learned model's latest snapshot (requests read it, the learner replaces it), and the
    /// lessons the engine's scorer gave that the learner has not had yet.
    pub shared: Shared,
    pub budget: WindowBudget,
    pub counters: Counters,
    /// `switching` routes: the core's engine with LONDI's switching policy, and the handle to its
    /// controller. Decisions are a few microseconds of sparse dot products and learning happens
    /// when an episode ends (on the feedback path), so mutexes are enough here.
    switching: Option<(Mutex<Cascade>, SwitchHandle)>,
    /// Why the route's state file was refused at start, if it was: the route then serves with
    /// its large model's budget closed and its file left as it is, until an operator acts.
    refused_state: std::sync::OnceLock<String>,
    /// A cascade of tiers: the core's engine with the route's deferral policy. Each decision
    /// takes the lock for microseconds, never across an upstream call (an item's own state
    /// is in its [`tandem_core::engine::Walk`]).
    pub engine: Option<Mutex<Cascade>>,
}

impl RouteState {
    pub fn new(index: usize, cfg: RouteCfg, now: u64) -> Result<Self, GatewayError> {
        let internal = |e: tandem_core::CoreError| GatewayError::Internal(e.to_string());
        let c = &cfg.cfg;
        let budget = WindowBudget::new(cfg.limits, c.budget.window_s, now).map_err(internal)?;
        let switching = match c.kind {
            RouteKind::Switching => {
                let (engine, handle) = switching_cascade(&cfg).map_err(internal)?;
                Some((Mutex::new(engine), handle))
            }
            _ => None,
        };
        let shared = Shared::new(Learned::for_route(&cfg)?);
        let engine = if cfg.tiers.len() >= 2 {
            Some(Mutex::new(engine_cascade(&cfg, &shared).map_err(internal)?))
        } else {
            None
        };
        Ok(RouteState {
            engine,
            switching,
            index,
            shared,
            budget,
            counters: Counters::default(),
            refused_state: std::sync::OnceLock::new(),
            cfg,
        })
    }

    pub fn name(&self) -> &str {
        &self.cfg.cfg.name
    }

    /// Marks the route's state file as refused (`why` names the file and the fault): its budget
    /// closes, and its state is no longer written (the file stays for the operator).
    pub fn refuse_state(&self, why: String) {
        self.budget.close();
        metrics::gauge!("tandem_route_state_refused", "route" => self.name().to_string()).set(1.0);
        let _ = self.refused_state.set(why);
    }

    /// Why the route's state file was refused, if it was.
    pub fn refused_state(&self) -> Option<&str> {
        self.refused_state.get().map(String::as_str)
    }

    /// A switching route's controller: its episodes' rewards and ends, its snapshots.
    pub fn switch(&self) -> Option<&SwitchHandle> {
        self.switching.as_ref().map(|(_, h)| h)
    }

    /// A switching route's engine, which decides each step's model.
    pub fn switch_engine(&self) -> Option<MutexGuard<'_, Cascade>> {
        // Like the gate: a poisoned lock still holds a usable policy.
        self.switching
            .as_ref()
            .map(|(m, _)| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The route's cascade engine, if it runs one.
    pub fn engine(&self) -> Option<MutexGuard<'_, Cascade>> {
        // A policy is only mutated by whole decisions; a poisoned lock still holds a usable one.
        self.engine
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The share controller of the engine policy's gate, when it gates (a two-model route);
    /// else the idle one of the route's configured gate, which state files keep in the same
    /// place (so files from before a route moved onto the engine still load).
    pub fn share_controller(
        &self,
    ) -> Result<tandem_core::calibrate::ShareController, GatewayError> {
        if let Some(mut e) = self.engine() {
            if let Some(g) = e.policy_mut().gate_mut() {
                return Ok(g.share_controller().clone());
            }
        }
        route_gate(&self.cfg.cfg)
            .map(|g| g.share_controller().clone())
            .map_err(|e| GatewayError::Internal(e.to_string()))
    }

    /// Restores the share controller a state file kept (into the engine policy's gate, if it
    /// has one; others have no share to restore).
    pub fn restore_share_controller(&self, share: tandem_core::calibrate::ShareController) {
        if let Some(mut e) = self.engine() {
            if let Some(g) = e.policy_mut().gate_mut() {
                g.restore_share_controller(share);
            }
        }
    }
}
