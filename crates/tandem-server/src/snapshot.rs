//! A route's learned scorer as the engine's policy sees it. The learner thread owns the master
//! copy of a `route_before` router or a `learned` cascade scorer (and, with `[server.shared]`,
//! the replicas keep theirs in step through Redis); requests score with its latest snapshot.
//! So the engine's policy (core's `Gated`) holds these stand-ins: each scores with the snapshot
//! and, asked to learn, puts the lesson in the route's outbox, which the gateway hands to the
//! learner (and to the other replicas) once the engine's lock is released.

use crate::route::{LearnEvent, Learned};
use arc_swap::ArcSwap;
use std::sync::{Arc, Mutex};
use tandem_core::features::Scratch;
use tandem_core::policy::{CascadeScorer, Observation, RouteScorer};
use tandem_core::{Answer, Query};

/// Lessons a route's engine produced and the learner has not yet been handed.
#[derive(Clone, Default)]
pub struct Outbox(Arc<Mutex<Vec<LearnEvent>>>);

impl Outbox {
    fn push(&self, ev: LearnEvent) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(ev);
    }

    /// Everything put in so far, oldest first.
    pub fn take(&self) -> Vec<LearnEvent> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The route's latest published model, and where its lessons go.
#[derive(Clone)]
pub struct Shared {
    pub model: Arc<ArcSwap<Learned>>,
    pub outbox: Outbox,
}

impl Shared {
    pub fn new(learned: Learned) -> Self {
        Shared {
            model: Arc::new(ArcSwap::from_pointee(learned)),
            outbox: Outbox::default(),
        }
    }

    /// Scores with the latest snapshot; 0 (no preference) when the route learns no such model.
    fn score_with(
        &self,
        scratch: &mut Option<Scratch>,
        f: impl FnOnce(&Learned, &mut Scratch) -> Option<f32>,
    ) -> f32 {
        let model = self.model.load();
        if scratch.is_none() {
            *scratch = model.scratch();
        }
        match scratch {
            Some(s) => f(&model, s).unwrap_or(0.0),
            None => 0.0,
        }
    }
}

/// A `route_before` route's router: scores the prompt before any call.
pub struct SnapshotRouter {
    shared: Shared,
    scratch: Option<Scratch>,
}

impl SnapshotRouter {
    pub fn new(shared: Shared) -> Self {
        SnapshotRouter {
            shared,
            scratch: None,
        }
    }
}

impl RouteScorer for SnapshotRouter {
    fn score(&mut self, query: &Query) -> f32 {
        self.shared.score_with(&mut self.scratch, |m, s| match m {
            Learned::Router(r) => Some(r.score_ref(query, s)),
            _ => None,
        })
    }

    fn learn(&mut self, query: &Query, observed: &Observation) {
        self.shared.outbox.push(LearnEvent {
            query: query.clone(),
            small: None,
            observed: *observed,
        });
    }
}

/// A `learned` cascade route's scorer: scores the small model's answer.
pub struct SnapshotCascade {
    shared: Shared,
    scratch: Option<Scratch>,
}

impl SnapshotCascade {
    pub fn new(shared: Shared) -> Self {
        SnapshotCascade {
            shared,
            scratch: None,
        }
    }
}

impl CascadeScorer for SnapshotCascade {
    fn score(&mut self, query: &Query, weak: &Answer) -> f32 {
        self.shared.score_with(&mut self.scratch, |m, s| match m {
            Learned::Cascade(c) => Some(c.score_ref(query, weak, s)),
            _ => None,
        })
    }

    fn learn(&mut self, query: &Query, weak: &Answer, observed: &Observation) {
        self.shared.outbox.push(LearnEvent {
            query: query.clone(),
            small: Some(weak.clone()),
            observed: *observed,
        });
    }
}
