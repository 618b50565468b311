//! A route's large-model budget per time window, on top of the engine's [`Budget`] (which reserves
//! before a call and trues up after, so concurrent requests can never pass the cap together). A new
//! window starts a fresh engine budget; calls still in flight settle into the window they reserved in.
//! With a spend journal attached ([`crate::journal`]), every reservation, settlement and release is
//! also written there, so spend survives a crash.

use crate::error::GatewayError;
use crate::journal::{Journal, Ticket};
use crate::shared::{RouteShare, SharedHold};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tandem_core::{Budget, BudgetLimits, CoreError, Micros, Reservation};

pub struct WindowBudget {
    limits: BudgetLimits,
    /// Window length in seconds; None: one window for the life of the state.
    window_s: Option<u64>,
    current: Mutex<Window>,
    /// No more reservations: the route's persisted spend could not be read, and a cap that
    /// forgot its spend could be passed.
    closed: AtomicBool,
    /// The route's spend journal (capped routes with a `state_dir`), attached once at start.
    journal: OnceLock<Journal>,
    /// The route's budget shared with other replicas through Redis (`[server.shared]`).
    shared: OnceLock<Arc<RouteShare>>,
}

struct Window {
    /// Start of the window, in seconds since the Unix epoch (0 when unwindowed).
    start: u64,
    budget: Arc<Budget>,
}

/// A reservation bound to the window it was taken in (and, on a journaled route, to its reserve
/// record). Settle it with the real cost, release it when the call was not made, or keep it
/// whole. Dropped without any of these, it is kept whole — the call may have run — unless
/// [`Held::durable`] failed, in which case the call was never made and it is released.
#[must_use = "settle or release the reservation"]
pub struct Held {
    budget: Arc<Budget>,
    /// None once settled or released.
    reservation: Option<Reservation>,
    ticket: Option<Ticket>,
    /// [`Held::durable`] failed: the call it would pay for is not made.
    not_durable: AtomicBool,
    /// An attempt may have reached the upstream without an answer (it timed out, or its
    /// connection or body broke): a release keeps the call counted.
    uncertain: AtomicBool,
    /// The reservation in the shared store, on a route shared between replicas.
    shared: Option<SharedPart>,
}

struct SharedPart {
    link: Arc<RouteShare>,
    window_start: u64,
    retry_after_s: Option<u64>,
    hold: Mutex<SharedHold>,
}

impl Held {
    /// Replaces the estimate by the real cost, `actual` micro-dollars (journaled without waiting:
    /// a lost settlement only over-counts).
    pub fn settle(mut self, actual: Micros) {
        if let Some(r) = self.reservation.take() {
            self.budget.settle(r, actual);
            if let Some(t) = &self.ticket {
                t.settle(actual);
            }
            if let Some(s) = &self.shared {
                s.link.settle(&s.hold, actual);
            }
        }
    }

    /// Gives the reservation back: the call was not made (journaled without waiting). After
    /// [`Held::mark_uncertain`] the call stays counted (at $0) instead.
    pub fn release(mut self) {
        if self.uncertain.load(Ordering::SeqCst) {
            self.settle(0);
            return;
        }
        if let Some(r) = self.reservation.take() {
            self.budget.release(r);
            if let Some(t) = &self.ticket {
                t.release();
            }
            if let Some(s) = &self.shared {
                s.link.release(&s.hold);
            }
        }
    }

    /// Some attempt may have reached the upstream without giving an answer (a timeout, a
    /// connection or body that broke): a release then keeps the call counted against
    /// `max_calls` (at $0: what it cost is unknown), so upstreams that hang cannot take more
    /// calls than the cap. Its dollars are not counted: a provider that bills abandoned calls
    /// is billed more than the budget shows.
    pub fn mark_uncertain(&self) {
        self.uncertain.store(true, Ordering::SeqCst);
    }

    /// The cost reserved, in micro-dollars.
    pub fn estimate(&self) -> Micros {
        self.reservation.as_ref().map_or(0, Reservation::estimate)
    }

    /// Keeps the whole reservation as spent: the call ran, what it cost is unknown, and the
    /// budget must not be passed. Returns the estimate kept, in micro-dollars.
    pub fn keep(self) -> Micros {
        let e = self.estimate();
        self.settle(e);
        e
    }

    /// Resolves once the reservation is durable — on disk in the route's spend journal, or
    /// taken in the shared store on a route whose budget replicas share — and may be spent:
    /// await it right before making the call it pays for. Resolves at once on a route without
    /// either (no cap, no `state_dir`, no `[server.shared]`). Safe to await again.
    ///
    /// Errors (the call must then not be made; dropping the `Held` gives the reservation back):
    /// [`GatewayError::SpendNotDurable`] when the reserve record could not be written (disk
    /// full, I/O error, the journal closed at shutdown); [`GatewayError::BudgetExhausted`] when
    /// the replicas together have spent the cap; [`GatewayError::BudgetStoreDown`] when Redis
    /// cannot be asked and the route may not spend without it.
    pub async fn durable(&self) -> Result<(), GatewayError> {
        if let Some(t) = &self.ticket {
            t.durable().await.map_err(|e| {
                self.not_durable.store(true, Ordering::SeqCst);
                GatewayError::SpendNotDurable {
                    route: t.route().to_string(),
                    reason: e.to_string(),
                }
            })?;
        }
        if let Some(s) = &self.shared {
            let estimate = self.estimate();
            s.link
                .reserve(&s.hold, s.window_start, estimate, s.retry_after_s)
                .await
                .inspect_err(|_| self.not_durable.store(true, Ordering::SeqCst))?;
        }
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(r) = self.reservation.take() else {
            return;
        };
        if self.not_durable.load(Ordering::SeqCst) {
            self.budget.release(r);
            if let Some(t) = &self.ticket {
                t.release();
            }
            if let Some(s) = &self.shared {
                s.link.release(&s.hold);
            }
        } else {
            let e = r.estimate();
            self.budget.settle(r, e);
            if let Some(t) = &self.ticket {
                t.settle(e);
            }
            if let Some(s) = &self.shared {
                s.link.settle(&s.hold, e);
            }
        }
    }
}

/// Spend in the current window, as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Spent {
    pub window_start: u64,
    pub calls: u64,
    pub micros: Micros,
}

impl WindowBudget {
    pub fn new(limits: BudgetLimits, window_s: Option<u64>, now: u64) -> Result<Self, CoreError> {
        let b = WindowBudget {
            limits,
            window_s,
            current: Mutex::new(Window {
                start: 0,
                budget: Arc::new(Budget::new(limits)?),
            }),
            closed: AtomicBool::new(false),
            journal: OnceLock::new(),
            shared: OnceLock::new(),
        };
        b.lock().start = b.window_start(now);
        Ok(b)
    }

    /// Restores spend from a checkpoint, if it is of the window `now` falls in.
    pub fn restore(&self, spent: Spent, now: u64) -> Result<(), CoreError> {
        let mut w = self.lock();
        if spent.window_start == self.window_start(now) {
            w.start = spent.window_start;
            w.budget = Arc::new(Budget::with_spent(self.limits, spent.calls, spent.micros)?);
        }
        Ok(())
    }

    fn window_start(&self, now: u64) -> u64 {
        match self.window_s {
            Some(len) => now - now % len,
            None => 0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        // The window is replaced whole; a panic elsewhere cannot leave it half-written.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn budget_at(&self, now: u64) -> Result<(u64, Arc<Budget>), CoreError> {
        let mut w = self.lock();
        let start = self.window_start(now);
        if start != w.start {
            w.start = start;
            w.budget = Arc::new(Budget::new(self.limits)?);
        }
        Ok((w.start, w.budget.clone()))
    }

    /// Reserves one large call costing at most `estimate` micro-dollars at `now` (seconds since
    /// the epoch), or None when the window's cap is reached. On a journaled route the reserve
    /// record is queued here; [`Held::durable`] says when it is on disk.
    pub fn try_reserve(&self, estimate: Micros, now: u64) -> Option<Held> {
        if self.is_closed() {
            return None;
        }
        let (start, budget) = self.budget_at(now).ok()?;
        let reservation = budget.try_reserve(estimate)?;
        let ticket = self.journal.get().map(|j| j.reserve(start, estimate));
        let shared = self.shared.get().map(|link| SharedPart {
            link: link.clone(),
            window_start: start,
            retry_after_s: self.seconds_to_reset(now),
            hold: Mutex::new(SharedHold::Pending),
        });
        Some(Held {
            budget,
            reservation: Some(reservation),
            ticket,
            not_durable: AtomicBool::new(false),
            uncertain: AtomicBool::new(false),
            shared,
        })
    }

    /// Shares the route's budget with other replicas through Redis (once, at start): every
    /// reservation is then also taken there, by [`Held::durable`]. A second one is refused.
    pub fn attach_shared(&self, s: Arc<RouteShare>) -> Result<(), Arc<RouteShare>> {
        self.shared.set(s)
    }

    /// The route's link to the shared store, if replicas share its budget.
    pub fn shared(&self) -> Option<&Arc<RouteShare>> {
        self.shared.get()
    }

    /// Attaches the route's spend journal (once, at start, after its spend was restored from
    /// it); a second one is refused and returned.
    pub fn attach_journal(&self, j: Journal) -> Result<(), Journal> {
        self.journal.set(j)
    }

    /// The route's spend journal, if it keeps one.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.get()
    }

    /// Whether the budget caps anything (calls or dollars): only then is its spend journaled.
    pub fn is_capped(&self) -> bool {
        self.limits.max_calls.is_some() || self.limits.max_micros.is_some()
    }

    /// Window length in seconds (None: one window for the life of the state).
    pub fn window_s(&self) -> Option<u64> {
        self.window_s
    }

    pub fn spent(&self) -> Spent {
        let w = self.lock();
        Spent {
            window_start: w.start,
            calls: w.budget.calls(),
            micros: w.budget.spent_micros(),
        }
    }

    pub fn limits(&self) -> BudgetLimits {
        self.limits
    }

    /// Refuses every reservation from now on (until a restart with readable state).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Seconds from `now` until the current window ends and a fresh budget starts; None without
    /// a window (the budget never resets by itself).
    pub fn seconds_to_reset(&self, now: u64) -> Option<u64> {
        self.window_s.map(|len| len - now % len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(calls: u64) -> BudgetLimits {
        BudgetLimits {
            max_calls: Some(calls),
            max_micros: None,
        }
    }

    #[test]
    fn a_new_window_starts_fresh_and_old_calls_settle_in_theirs() {
        let b = WindowBudget::new(limits(2), Some(60), 1000).unwrap();
        let h1 = b.try_reserve(5, 1000).unwrap();
        let _h2 = b.try_reserve(5, 1010).unwrap();
        assert!(b.try_reserve(5, 1019).is_none(), "cap of 2 in the window");
        // 1020 is the next window (960..1020, 1020..1080).
        let h3 = b.try_reserve(5, 1020).unwrap();
        h1.settle(3);
        assert_eq!(b.spent().calls, 1);
        assert_eq!(b.spent().micros, 5);
        h3.release();
        assert_eq!(b.spent().calls, 0);
    }

    #[test]
    fn a_dropped_reservation_is_kept_whole() {
        let b = WindowBudget::new(limits(5), None, 0).unwrap();
        let h = b.try_reserve(9, 0).unwrap();
        drop(h);
        // The call may have run: it stays counted at its estimate.
        assert_eq!((b.spent().calls, b.spent().micros), (1, 9));
        // Without a journal, `durable` is immediate.
        let h = b.try_reserve(4, 0).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(h.durable())
            .unwrap();
        h.release();
        assert_eq!((b.spent().calls, b.spent().micros), (1, 9));
    }

    #[test]
    fn restore_keeps_spend_only_within_the_same_window() {
        let b = WindowBudget::new(limits(3), Some(60), 1000).unwrap();
        let spent = Spent {
            window_start: 960,
            calls: 3,
            micros: 9,
        };
        b.restore(spent, 1000).unwrap();
        assert!(b.try_reserve(1, 1000).is_none());
        let b = WindowBudget::new(limits(3), Some(60), 1100).unwrap();
        b.restore(spent, 1100).unwrap();
        assert!(
            b.try_reserve(1, 1100).is_some(),
            "an old window's spend is gone"
        );
        let unwindowed = WindowBudget::new(limits(3), None, 5).unwrap();
        unwindowed
            .restore(
                Spent {
                    window_start: 0,
                    ..spent
                },
                99_999,
            )
            .unwrap();
        assert!(unwindowed.try_reserve(1, 99_999).is_none());
    }
}
