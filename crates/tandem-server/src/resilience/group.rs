//! Groups of upstreams and one request's walk through its group.

use super::breaker::{Admit, Breaker, BreakerConfig, BreakerState};
use super::retry::{retry_after, Cure, RetryConfig};
use crate::error::GatewayError;
use crate::upstream::Upstream;
use rand::Rng;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// A role's upstreams (indices into the gateway's upstreams), tried in order, or — when weights
/// are given — starting from one drawn by weight, then by falling weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub members: Vec<usize>,
    pub weights: Option<Vec<u32>>,
}

impl Group {
    pub fn one(i: usize) -> Group {
        Group {
            members: vec![i],
            weights: None,
        }
    }

    /// The first upstream in configured order.
    pub fn primary(&self) -> usize {
        self.members.first().copied().unwrap_or(0)
    }

    /// The order one request tries the members in.
    pub fn order(&self, rng: &mut impl Rng) -> Vec<usize> {
        let Some(w) = &self.weights else {
            return self.members.clone();
        };
        let total: u64 = w.iter().map(|&x| u64::from(x)).sum();
        let mut pick = rng.gen_range(0..total.max(1));
        let mut first = 0;
        for (i, &x) in w.iter().enumerate() {
            if pick < u64::from(x) {
                first = i;
                break;
            }
            pick -= u64::from(x);
        }
        let mut rest: Vec<usize> = (0..self.members.len()).filter(|&i| i != first).collect();
        // Stable: equal weights keep their configured order.
        rest.sort_by_key(|&i| std::cmp::Reverse(w[i]));
        std::iter::once(first)
            .chain(rest)
            .map(|i| self.members[i])
            .collect()
    }
}

/// One upstream's live resilience state: its breaker and its concurrency limit.
#[derive(Debug)]
pub struct Health {
    name: String,
    breaker: Mutex<Breaker>,
    limit: Option<Arc<Semaphore>>,
    max_concurrency: Option<u32>,
    pub retry: RetryConfig,
}

/// Why an upstream cannot take a call now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Its breaker is open, for about this long.
    Open(Duration),
    /// Its concurrency limit is reached.
    Full,
}

impl Health {
    pub fn new(
        name: &str,
        retry: RetryConfig,
        breaker: BreakerConfig,
        max_concurrency: Option<u32>,
    ) -> Health {
        let h = Health {
            name: name.to_string(),
            breaker: Mutex::new(Breaker::new(breaker, Instant::now())),
            limit: max_concurrency.map(|n| Arc::new(Semaphore::new(n as usize))),
            max_concurrency,
            retry,
        };
        h.publish(BreakerState::Closed);
        h
    }

    fn lock(&self) -> MutexGuard<'_, Breaker> {
        // The breaker is updated whole under the lock; a poisoned one is still consistent.
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, s: BreakerState) {
        metrics::gauge!("tandem_upstream_breaker_state", "upstream" => self.name.clone())
            .set(s.gauge());
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state(Instant::now())
    }

    /// Sets the `tandem_upstream_breaker_state` gauge to the breaker's state now.
    pub fn publish_state(&self) {
        self.publish(self.state());
    }

    /// Calls in flight, when the upstream has a concurrency limit.
    pub fn in_flight(&self) -> Option<u32> {
        let (lim, max) = (self.limit.as_ref()?, self.max_concurrency?);
        Some(max.saturating_sub(lim.available_permits() as u32))
    }

    /// A call may go now: its breaker admits it and a concurrency slot is free.
    pub fn try_admit(self: &Arc<Self>) -> Result<Ticket, Busy> {
        let permit = match &self.limit {
            None => None,
            Some(l) => Some(l.clone().try_acquire_owned().map_err(|_| Busy::Full)?),
        };
        self.admit_with(permit)
    }

    /// Like [`Health::try_admit`], waiting for a concurrency slot.
    pub async fn admit(self: &Arc<Self>) -> Result<Ticket, Busy> {
        let permit = match &self.limit {
            None => None,
            Some(l) => Some(l.clone().acquire_owned().await.map_err(|_| Busy::Full)?),
        };
        self.admit_with(permit)
    }

    fn admit_with(self: &Arc<Self>, permit: Option<OwnedSemaphorePermit>) -> Result<Ticket, Busy> {
        let now = Instant::now();
        let mut b = self.lock();
        match b.admit(now) {
            Admit::Yes { probe } => {
                // Only a probe moves the state (open to half-open); an ordinary call leaves the
                // gauge as it is, off the hot path.
                if probe {
                    let s = b.state(now);
                    drop(b);
                    self.publish(s);
                }
                Ok(Ticket {
                    health: self.clone(),
                    probe,
                    _permit: permit,
                    open: true,
                })
            }
            Admit::No { retry_in } => Err(Busy::Open(retry_in)),
        }
    }
}

/// One admitted call: report its outcome with [`Ticket::finish`]; dropped unfinished (the
/// request was cancelled), it frees its probe slot. Holds the concurrency slot while alive.
#[derive(Debug)]
pub struct Ticket {
    health: Arc<Health>,
    probe: bool,
    _permit: Option<OwnedSemaphorePermit>,
    open: bool,
}

impl Ticket {
    /// `ok` false only for a failure of the upstream's own ([`Cure::blames_upstream`]).
    pub fn finish(mut self, ok: bool) {
        self.open = false;
        let now = Instant::now();
        let mut b = self.health.lock();
        let before = b.state(now);
        b.record(ok, self.probe, now);
        let after = b.state(now);
        drop(b);
        if before != after {
            tracing::warn!(upstream = %self.health.name, from = before.name(), to = after.name(), "circuit breaker");
            self.health.publish(after);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.open {
            self.health.lock().cancel(self.probe);
        }
    }
}

/// One request's walk through a group: which upstream to try next, and when.
pub struct Attempts<'a> {
    ups: &'a [Upstream],
    /// Members in the order tried, each with its failures so far, when it may be tried again,
    /// and whether it is out for this request.
    members: Vec<Member>,
    last: Option<GatewayError>,
    /// The soonest an open breaker of a skipped member closes.
    open_for: Option<Duration>,
    rng: rand_chacha::ChaCha8Rng,
    role: &'static str,
}

struct Member {
    up: usize,
    failures: u32,
    not_before: Option<Instant>,
    out: bool,
}

impl<'a> Attempts<'a> {
    /// `role` names the group in errors ("small", "large"); `seed` draws the weighted order and
    /// the backoff jitter.
    pub fn new(ups: &'a [Upstream], group: &Group, role: &'static str, seed: u64) -> Self {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let members = group
            .order(&mut rng)
            .into_iter()
            .map(|up| Member {
                up,
                failures: 0,
                not_before: None,
                out: false,
            })
            .collect();
        Attempts {
            ups,
            members,
            last: None,
            open_for: None,
            rng,
            role,
        }
    }

    /// The next upstream to call and its ticket; waits for a backoff or a concurrency slot when
    /// no member can take the call now. None when no member is left: [`Attempts::error`] says why.
    pub async fn next(&mut self) -> Option<(&'a Upstream, Ticket)> {
        loop {
            let now = Instant::now();
            let mut wait: Option<Instant> = None;
            let mut full: Option<usize> = None;
            for m in self.members.iter_mut().filter(|m| !m.out) {
                let Some(up) = self.ups.get(m.up) else {
                    m.out = true;
                    continue;
                };
                if let Some(t) = m.not_before.filter(|&t| t > now) {
                    wait = Some(wait.map_or(t, |w: Instant| w.min(t)));
                    continue;
                }
                match up.health.try_admit() {
                    Ok(t) => return Some((up, t)),
                    Err(Busy::Open(d)) => {
                        // An open breaker is out for this request: its cool-down is longer
                        // than a request should wait.
                        m.out = true;
                        self.open_for = Some(self.open_for.map_or(d, |o| o.min(d)));
                    }
                    Err(Busy::Full) => {
                        full.get_or_insert(m.up);
                    }
                }
            }
            match (full, wait) {
                // Every member that could serve now is at its limit: queue on the first one.
                (Some(i), _) => {
                    let up = self.ups.get(i)?;
                    match up.health.admit().await {
                        Ok(t) => return Some((up, t)),
                        Err(Busy::Open(d)) => {
                            self.open_for = Some(d);
                            if let Some(m) = self.members.iter_mut().find(|m| m.up == i) {
                                m.out = true;
                            }
                        }
                        Err(Busy::Full) => return None,
                    }
                }
                (None, Some(t)) => tokio::time::sleep_until(t).await,
                (None, None) => return None,
            }
        }
    }

    /// A failed attempt on `up`: its ticket is finished (the breaker counts the failure when it
    /// is the upstream's own), and the member is scheduled for a retry or put out. Returns the
    /// error when no other attempt can cure it.
    pub fn failed(
        &mut self,
        up: &Upstream,
        ticket: Ticket,
        e: GatewayError,
    ) -> Result<(), GatewayError> {
        let cure = Cure::of(&e);
        ticket.finish(!cure.blames_upstream());
        let outcome = match cure {
            Cure::Retry => "retry",
            Cure::Elsewhere => "elsewhere",
            Cure::Stop => "stop",
        };
        metrics::counter!("tandem_upstream_failures_total", "upstream" => up.name.clone(), "cure" => outcome)
            .increment(1);
        if cure == Cure::Stop {
            return Err(e);
        }
        let retry = &up.health.retry;
        let asked = retry_after(&e, SystemTime::now());
        if let Some(m) = self.members.iter_mut().find(|m| m.up == up.index) {
            m.failures += 1;
            let too_long =
                asked.is_some_and(|d| d > Duration::from_millis(retry.max_retry_after_ms));
            if cure == Cure::Elsewhere || m.failures >= retry.attempts || too_long {
                m.out = true;
            } else {
                let wait = retry
                    .backoff(m.failures, &mut self.rng)
                    .max(asked.unwrap_or_default());
                m.not_before = Some(Instant::now() + wait);
            }
        }
        self.last = Some(e);
        Ok(())
    }

    /// Whether another attempt may follow (some member is not out).
    pub fn more(&self) -> bool {
        self.members.iter().any(|m| !m.out)
    }

    /// Why the walk ended without an answer: the last upstream error, or — when every member's
    /// breaker was open — a 503 saying when one closes.
    pub fn error(self) -> GatewayError {
        match self.last {
            Some(e) => e,
            None => GatewayError::NoUpstream {
                role: self.role.to_string(),
                // Rounded up: a client that waits this long finds a breaker ready to probe.
                retry_after_s: self
                    .open_for
                    .map(|d| (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn weighted_order_draws_the_first_by_weight_then_falls_by_weight() {
        let g = Group {
            members: vec![10, 11, 12],
            weights: Some(vec![6, 3, 1]),
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut firsts = [0u32; 3];
        for _ in 0..10_000 {
            let o = g.order(&mut rng);
            assert_eq!(o.len(), 3);
            let mut sorted = o.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![10, 11, 12], "each member once");
            firsts[o[0] - 10] += 1;
            if o[0] == 12 {
                assert_eq!(o, vec![12, 10, 11]);
            }
        }
        let share = |i: usize| f64::from(firsts[i]) / 10_000.0;
        assert!((share(0) - 0.6).abs() < 0.03, "{firsts:?}");
        assert!((share(1) - 0.3).abs() < 0.03, "{firsts:?}");
        assert!((share(2) - 0.1).abs() < 0.02, "{firsts:?}");
        let ordered = Group {
            members: vec![4, 2, 9],
            weights: None,
        };
        assert_eq!(ordered.order(&mut rng), vec![4, 2, 9]);
    }
}
