//! What a replica shares with the others through Redis besides budgets
//! ([`crate::shared::RouteShare`]): feedback records ([`crate::shared::feedback`]) and learning
//! ([`crate::shared::learning`]). Both stay off the request path: a request hands its record or
//! its learning event to a task and goes on.

use crate::feedback::{FeedbackLog, Pending, Served};
use crate::learner::Msg;
use crate::route::{LearnEvent, RouteState};
use crate::shared::SharedStore;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_core::policy::Observation;
use tandem_core::{Answer, Query};
use tokio::sync::mpsc;

/// Entries kept per route stream (about; Redis trims in whole nodes).
const STREAM_KEEP: u64 = 100_000;
/// Events kept for Redis while it is away; past it the oldest go (and are counted).
const OUTBOX_MAX: usize = 100_000;
/// How often a replica reads what the others learned: the lag of shared learning, the same as
/// the learner's own publish interval.
const READ_EVERY: Duration = Duration::from_millis(100);

/// A feedback record as stored in Redis (the route by name: replicas share one config).
#[derive(Serialize, Deserialize)]
struct WirePending {
    route: String,
    query: Query,
    small: Option<Answer>,
    served: Served,
    served_text: String,
    learn: bool,
}

/// A learning event as appended to a route's stream.
#[derive(Serialize, Deserialize)]
struct WireEvent {
    query: Query,
    small: Option<Answer>,
    weak: Option<f32>,
    strong: Option<f32>,
}

pub(super) struct Replicas {
    store: Arc<SharedStore>,
    origin: String,
    feedback_ttl: Duration,
    /// Longest a feedback record's write may take (the store's operation timeout, and a margin):
    /// by then it is in Redis, or in this replica's own log.
    write_grace: Duration,
    outbox: mpsc::UnboundedSender<(usize, String)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Replicas {
    /// Starts sharing: `restored[i]` says route `i` started from its own saved state (it then
    /// reads the others' learning from now on; a route starting fresh first replays what its
    /// stream still holds).
    pub fn start(
        store: Arc<SharedStore>,
        origin: String,
        feedback_ttl: Duration,
        op_timeout: Duration,
        routes: Arc<Vec<RouteState>>,
        restored: Vec<bool>,
        learn_tx: std::sync::mpsc::Sender<Msg>,
    ) -> Replicas {
        let (outbox, rx) = mpsc::unbounded_channel();
        let names: Vec<String> = routes.iter().map(|r| r.name().to_string()).collect();
        let publish = tokio::spawn(publish_loop(
            store.clone(),
            origin.clone(),
            names.clone(),
            rx,
        ));
        let read = tokio::spawn(read_loop(
            store.clone(),
            origin.clone(),
            names,
            restored,
            learn_tx,
        ));
        Replicas {
            store,
            origin,
            feedback_ttl,
            write_grace: op_timeout + Duration::from_millis(100),
            outbox,
            tasks: vec![publish, read],
        }
    }

    /// This replica's name in Redis.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// How long after a response its feedback record may still be on its way: records are
    /// written off the request path ([`Replicas::keep`]), so feedback sent right after its
    /// response, to any replica, can arrive before its record.
    pub fn write_grace(&self) -> Duration {
        self.write_grace
    }

    /// Shares what route `route` learned; the local learner has it already.
    pub fn learned(&self, route: usize, ev: &LearnEvent) {
        let wire = WireEvent {
            query: ev.query.clone(),
            small: ev.small.clone(),
            weak: ev.observed.weak,
            strong: ev.observed.strong,
        };
        match serde_json::to_string(&wire) {
            Ok(json) => {
                let _ = self.outbox.send((route, json));
            }
            Err(e) => tracing::warn!(error = %e, "shared learning: event not encodable"),
        }
    }

    /// Stores response `id`'s feedback record in Redis; if that fails, in this replica's log.
    pub fn keep(&self, id: String, p: Pending, route_name: &str, log: &Arc<Mutex<FeedbackLog>>) {
        let wire = WirePending {
            route: route_name.to_string(),
            query: p.query.clone(),
            small: p.small.clone(),
            served: p.served,
            served_text: p.served_text.clone(),
            learn: p.learn,
        };
        let Ok(json) = serde_json::to_string(&wire) else {
            insert(log, id, p);
            return;
        };
        let store = self.store.clone();
        let ttl = self.feedback_ttl;
        let log = log.clone();
        tokio::spawn(async move {
            if let Err(e) = store.put_response(&id, &json, ttl).await {
                if matches!(e, crate::shared::SharedError::Timeout { .. }) {
                    // It may still land: it must not live in Redis and here both.
                    store.forget_response_later(&id);
                }
                metrics::counter!("tandem_shared_store_errors_total", "op" => "put_response")
                    .increment(1);
                tracing::debug!(error = %e, "feedback record kept on this replica only");
                insert(&log, id, p);
            }
        });
    }

    /// Takes response `id`'s record from Redis: Ok(None) when Redis has none (unknown, expired,
    /// taken, or kept on the replica that served it), Err when Redis cannot be asked.
    pub async fn take(
        &self,
        id: &str,
        route_index: impl Fn(&str) -> Option<usize>,
    ) -> Result<Option<Pending>, String> {
        let json = self
            .store
            .take_response(id)
            .await
            .map_err(|e| e.to_string())?;
        let Some(json) = json else {
            return Ok(None);
        };
        let w: WirePending = serde_json::from_str(&json)
            .map_err(|e| format!("feedback record of `{id}` in Redis is not readable: {e}"))?;
        let route = route_index(&w.route).ok_or_else(|| {
            format!(
                "feedback record of `{id}` names route `{}`, which this replica does not have",
                w.route
            )
        })?;
        Ok(Some(Pending {
            route,
            query: w.query,
            small: w.small,
            served: w.served,
            served_text: w.served_text,
            learn: w.learn,
            walk: None,
        }))
    }

    /// Puts a record taken by [`Replicas::take`] back (the feedback on it was refused).
    pub fn put_back(
        &self,
        id: String,
        p: Pending,
        route_name: &str,
        log: &Arc<Mutex<FeedbackLog>>,
    ) {
        self.keep(id, p, route_name, log);
    }
}

fn insert(log: &Mutex<FeedbackLog>, id: String, p: Pending) {
    log.lock().unwrap_or_else(|e| e.into_inner()).insert(id, p);
}

/// Appends queued events, a batch per route per round trip; keeps them while Redis is away.
async fn publish_loop(
    store: Arc<SharedStore>,
    origin: String,
    names: Vec<String>,
    mut rx: mpsc::UnboundedReceiver<(usize, String)>,
) {
    let mut pending: VecDeque<(usize, String)> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(e) => pending.push_back(e),
                None => return,
            }
        }
        while let Ok(e) = rx.try_recv() {
            pending.push_back(e);
        }
        if pending.len() > OUTBOX_MAX {
            let over = pending.len() - OUTBOX_MAX;
            pending.drain(..over);
            metrics::counter!("tandem_shared_learning_dropped_total").increment(over as u64);
            tracing::warn!(
                dropped = over,
                "shared learning: Redis away too long, oldest events not shared"
            );
        }
        let mut failed = false;
        for (ri, name) in names.iter().enumerate() {
            let batch: Vec<String> = pending
                .iter()
                .filter(|(r, _)| *r == ri)
                .map(|(_, e)| e.clone())
                .collect();
            if batch.is_empty() {
                continue;
            }
            match store
                .publish_learning(name, &origin, &batch, STREAM_KEEP)
                .await
            {
                Ok(()) => pending.retain(|(r, _)| *r != ri),
                Err(e) => {
                    metrics::counter!("tandem_shared_store_errors_total", "op" => "publish_learning")
                        .increment(1);
                    tracing::debug!(error = %e, "shared learning: kept for later");
                    failed = true;
                }
            }
        }
        if failed {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Applies what the other replicas learned, read every [`READ_EVERY`].
async fn read_loop(
    store: Arc<SharedStore>,
    origin: String,
    names: Vec<String>,
    restored: Vec<bool>,
    learn_tx: std::sync::mpsc::Sender<Msg>,
) {
    // None: where to start is not known yet (Redis was away at start).
    let mut cursors: Vec<Option<String>> = restored
        .iter()
        .map(|&r| if r { None } else { Some("0-0".to_string()) })
        .collect();
    let mut tick = tokio::time::interval(READ_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (i, c) in cursors.iter_mut().enumerate() {
            if c.is_none() {
                if let Ok(tail) = store.learning_tail(&names[i]).await {
                    *c = Some(tail);
                }
            }
        }
        let asked: Vec<(usize, (String, String))> = cursors
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, (names[i].clone(), c.clone()?))))
            .collect();
        let (index, pairs): (Vec<usize>, Vec<(String, String)>) = asked.into_iter().unzip();
        let read = match store.read_learning(&pairs, 1000).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "shared learning: read failed");
                continue;
            }
        };
        for l in read {
            let route = index[l.route];
            cursors[route] = Some(l.id.clone());
            if l.origin == origin {
                continue;
            }
            match serde_json::from_str::<WireEvent>(&l.event) {
                Ok(w) => {
                    metrics::counter!("tandem_shared_learning_applied_total", "route" => names[route].clone())
                        .increment(1);
                    let ev = LearnEvent {
                        query: w.query,
                        small: w.small,
                        observed: Observation {
                            weak: w.weak,
                            strong: w.strong,
                        },
                    };
                    if learn_tx.send(Msg::Learn(route, Box::new(ev))).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(route = %names[route], id = %l.id, error = %e, "shared learning: unreadable event skipped");
                }
            }
        }
    }
}
