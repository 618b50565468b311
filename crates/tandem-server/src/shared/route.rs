//! One route's budget as the gateway uses it with `[server.shared]`: each large call's
//! reservation is taken in Redis ([`SharedStore::reserve`]) before the call is made, on top of
//! the replica's own [`crate::budget::WindowBudget`] (which counts this replica's calls only, so
//! it never refuses what the shared cap allows). While Redis is unreachable the route's
//! [`OnRedisDown`] decides: no large calls, or a [`LocalShare`] whose spend is added to Redis
//! when Redis answers again.
//!
//! Settlements and refunds go to Redis off the request path (spawned): one that fails leaves
//! the reservation open, and it is kept as spent at its estimate once its hold passes — an
//! over-count, never an under-count.

use super::{
    LocalHeld, LocalShare, OnRedisDown, Reserve, SharedError, SharedReservation, SharedStore,
    Window,
};
use crate::error::GatewayError;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_core::{BudgetLimits, Micros};

/// A route's link to the shared store. Cheap to clone behind an `Arc`.
pub struct RouteShare {
    store: Arc<SharedStore>,
    local: LocalShare,
    route: String,
    limits: BudgetLimits,
    window_s: Option<u64>,
    hold: Duration,
    on_down: OnRedisDown,
}

/// Where one request's reservation stands in the shared store.
#[derive(Debug, Default)]
pub enum SharedHold {
    /// Reserved locally only; [`RouteShare::reserve`] not done yet.
    #[default]
    Pending,
    Redis(SharedReservation),
    /// Redis was unreachable: held against this replica's fail-open share.
    Local(LocalHeld),
    /// Settled, released, or never reserved.
    Done,
}

impl RouteShare {
    /// `route`'s budget (its whole caps, shared by every replica) in `store`; `hold`: how long
    /// a reservation may stay open before it is presumed to belong to a dead replica.
    pub fn new(
        store: Arc<SharedStore>,
        route: &str,
        limits: BudgetLimits,
        window_s: Option<u64>,
        hold: Duration,
        on_down: OnRedisDown,
    ) -> Self {
        RouteShare {
            store,
            local: LocalShare::new(limits, on_down),
            route: route.to_string(),
            limits,
            window_s,
            hold,
            on_down,
        }
    }

    fn window(&self, start_s: u64) -> Window {
        Window {
            start_s,
            len_s: self.window_s,
        }
    }

    /// Reserves `estimate` micro-dollars for one call in the window starting at `window_start`
    /// (seconds since the epoch), in Redis — or, Redis being unreachable, against the local
    /// share. Does nothing if `hold` is reserved already.
    ///
    /// Errors: [`GatewayError::BudgetExhausted`] when the shared cap would be passed;
    /// [`GatewayError::BudgetStoreDown`] when Redis cannot be asked and the route fails closed
    /// (or its local share is spent). Either way no call may be made.
    pub async fn reserve(
        &self,
        hold: &Mutex<SharedHold>,
        window_start: u64,
        estimate: Micros,
        retry_after_s: Option<u64>,
    ) -> Result<(), GatewayError> {
        if !matches!(*lock(hold), SharedHold::Pending) {
            return Ok(());
        }
        // Spend made alone while Redis was away lands before anything new is reserved.
        if self.local.has_unsynced() {
            self.sync().await;
        }
        let answer = self
            .store
            .reserve(
                &self.route,
                self.window(window_start),
                estimate,
                self.limits,
                self.hold,
            )
            .await;
        match answer {
            Ok(Reserve::Reserved {
                reservation,
                totals,
            }) => {
                self.local.observe(window_start, totals);
                *lock(hold) = SharedHold::Redis(reservation);
                Ok(())
            }
            Ok(Reserve::Refused { totals, .. }) => {
                self.local.observe(window_start, totals);
                *lock(hold) = SharedHold::Done;
                Err(GatewayError::BudgetExhausted {
                    route: self.route.clone(),
                    retry_after_s,
                })
            }
            Err(e) => {
                count_error("reserve", &e);
                // Down: Redis failed within the last second, said once already.
                if !matches!(e, SharedError::Down { .. }) {
                    tracing::warn!(route = %self.route, error = %e, "shared budget: Redis did not take the reservation; on_redis_down applies");
                }
                match self.local.try_reserve(window_start, estimate) {
                    Some(h) => {
                        *lock(hold) = SharedHold::Local(h);
                        Ok(())
                    }
                    None => {
                        *lock(hold) = SharedHold::Done;
                        Err(GatewayError::BudgetStoreDown {
                            route: self.route.clone(),
                            // Clients see no address of ours; the log has the details.
                            reason: match self.on_down {
                                OnRedisDown::FailClosed => {
                                    "the budget store is unreachable and the route fails closed"
                                        .to_string()
                                }
                                OnRedisDown::FailOpen { .. } => "the budget store is unreachable and this replica's share of the budget is spent".to_string(),
                            },
                        })
                    }
                }
            }
        }
    }

    /// The call cost `actual` micro-dollars (sent to Redis off the request path).
    pub fn settle(self: &Arc<Self>, hold: &Mutex<SharedHold>, actual: Micros) {
        match std::mem::replace(&mut *lock(hold), SharedHold::Done) {
            SharedHold::Redis(r) => {
                let me = self.clone();
                spawn(async move {
                    match me.store.settle(&r, actual).await {
                        Ok(c) => me.local.observe(r.window_start(), c.totals()),
                        // Left open, it is kept at its estimate once its hold passes.
                        Err(e) => count_error("settle", &e),
                    }
                });
            }
            SharedHold::Local(h) => self.local.settle(h, actual),
            SharedHold::Pending | SharedHold::Done => {}
        }
    }

    /// The call was not made: the reservation goes back (off the request path).
    pub fn release(self: &Arc<Self>, hold: &Mutex<SharedHold>) {
        match std::mem::replace(&mut *lock(hold), SharedHold::Done) {
            SharedHold::Redis(r) => {
                let me = self.clone();
                spawn(async move {
                    match me.store.release(&r).await {
                        Ok(c) => me.local.observe(r.window_start(), c.totals()),
                        Err(e) => count_error("release", &e),
                    }
                });
            }
            SharedHold::Local(h) => self.local.release(h),
            SharedHold::Pending | SharedHold::Done => {}
        }
    }

    /// Adds the spend made alone while Redis was unreachable to Redis; what cannot be added
    /// now is kept for the next try.
    pub async fn sync(&self) {
        for u in self.local.take_unsynced() {
            let added = self
                .store
                .add_spent(&self.route, self.window(u.window_start), u.calls, u.micros)
                .await;
            match added {
                Ok(totals) => {
                    tracing::info!(route = %self.route, calls = u.calls, micros = u.micros, "shared budget: spend made while Redis was away added");
                    self.local.observe(u.window_start, totals);
                }
                Err(e) => {
                    count_error("add_spent", &e);
                    self.local.restore_unsynced(u);
                }
            }
        }
    }

    pub fn has_unsynced(&self) -> bool {
        self.local.has_unsynced()
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }
}

fn lock(m: &Mutex<SharedHold>) -> std::sync::MutexGuard<'_, SharedHold> {
    // A hold is replaced whole; a panic elsewhere cannot leave it half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn count_error(op: &'static str, e: &SharedError) {
    metrics::counter!("tandem_shared_store_errors_total", "op" => op).increment(1);
    tracing::debug!(op, error = %e, "shared store");
}

/// Runs `f` on the current Tokio runtime. Outside one (a test dropping a reservation), nothing
/// is sent: the reservation stays open in Redis and is kept at its estimate after its hold.
fn spawn(f: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        h.spawn(f);
    }
}
