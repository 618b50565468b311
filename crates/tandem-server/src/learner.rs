//! Learning off the request path. One thread owns the master copy of every route's model, applies
//! what requests and feedback taught, and publishes a fresh snapshot (an `Arc` swap that requests
//! read without locking) at most every `publish_every`; it also checkpoints on an interval and on
//! shutdown. Events arrive over an unbounded channel: an accepted observation is never dropped.

use crate::persist;
use crate::route::{Counters, LearnEvent, Learned, RouteState};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::policy::{CascadeScorer, RouteScorer};

pub enum Msg {
    Learn(usize, Box<LearnEvent>),
    /// Apply everything sent before, publish, persist, then answer.
    Flush(tokio::sync::oneshot::Sender<Result<(), String>>),
    Stop,
}

pub struct LearnerHandle {
    tx: Sender<Msg>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LearnerHandle {
    pub fn sender(&self) -> Sender<Msg> {
        self.tx.clone()
    }

    /// Applies and persists everything sent so far.
    pub async fn flush(&self) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Msg::Flush(tx))
            .map_err(|_| "the learner has stopped".to_string())?;
        rx.await
            .map_err(|_| "the learner has stopped".to_string())?
    }
}

impl Drop for LearnerHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub struct LearnerConfig {
    pub state_dir: Option<PathBuf>,
    pub persist_every: Duration,
    pub publish_every: Duration,
    /// Every upstream's name, by index (a cascade policy's state names its tiers' upstreams).
    pub upstreams: Vec<String>,
}

pub fn spawn(
    routes: Arc<Vec<RouteState>>,
    masters: Vec<Learned>,
    cfg: LearnerConfig,
) -> Result<LearnerHandle, std::io::Error> {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("tandem-learner".into())
        .spawn(move || run(routes, masters, cfg, rx))?;
    Ok(LearnerHandle {
        tx,
        thread: Some(thread),
    })
}

fn run(
    routes: Arc<Vec<RouteState>>,
    mut masters: Vec<Learned>,
    cfg: LearnerConfig,
    rx: Receiver<Msg>,
) {
    let mut dirty = vec![false; masters.len()];
    let mut last_publish = Instant::now();
    let mut last_persist = Instant::now();
    loop {
        let wait = cfg.publish_every.min(cfg.persist_every);
        match rx.recv_timeout(wait) {
            Ok(Msg::Learn(i, ev)) => {
                if let (Some(m), Some(r)) = (masters.get_mut(i), routes.get(i)) {
                    apply(m, &ev);
                    Counters::bump(&r.counters.learned);
                    dirty[i] = true;
                }
            }
            Ok(Msg::Flush(reply)) => {
                publish(&routes, &masters, &mut dirty);
                let res = persist_all(&routes, &masters, &cfg);
                last_persist = Instant::now();
                let _ = reply.send(res);
            }
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                publish(&routes, &masters, &mut dirty);
                if let Err(e) = persist_all(&routes, &masters, &cfg) {
                    tracing::error!(error = %e, "could not persist learned state at shutdown");
                }
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if last_publish.elapsed() >= cfg.publish_every {
            publish(&routes, &masters, &mut dirty);
            last_publish = Instant::now();
        }
        // Counters and budgets change with every request, learned or not.
        if last_persist.elapsed() >= cfg.persist_every {
            if let Err(e) = persist_all(&routes, &masters, &cfg) {
                tracing::error!(error = %e, "could not persist learned state");
            }
            last_persist = Instant::now();
        }
    }
}

fn apply(m: &mut Learned, ev: &LearnEvent) {
    match m {
        Learned::Nothing => {}
        Learned::Router(r) => r.learn(&ev.query, &ev.observed),
        Learned::Cascade(c) => {
            if let Some(small) = &ev.small {
                c.learn(&ev.query, small, &ev.observed);
            }
        }
    }
}

fn publish(routes: &[RouteState], masters: &[Learned], dirty: &mut [bool]) {
    for ((r, m), d) in routes.iter().zip(masters).zip(dirty.iter_mut()) {
        if *d {
            r.shared.model.store(Arc::new(m.clone()));
            *d = false;
        }
    }
}

fn persist_all(
    routes: &[RouteState],
    masters: &[Learned],
    cfg: &LearnerConfig,
) -> Result<(), String> {
    let Some(dir) = &cfg.state_dir else {
        return Ok(());
    };
    let mut errors = Vec::new();
    for (r, m) in routes.iter().zip(masters) {
        if r.refused_state().is_some() {
            // Its refused file is the operator's evidence (and spend): never overwritten.
            continue;
        }
        if let Err(e) = persist::save(dir, r, m, &cfg.upstreams) {
            errors.push(e.to_string());
        }
        // The journal stays small: rewritten as its spend total and open reservations.
        if let Some(Err(e)) = r.budget.journal().map(|j| j.compact()) {
            errors.push(e.to_string());
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}
