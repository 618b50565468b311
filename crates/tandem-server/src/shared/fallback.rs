//! What a replica does about a route's budget while Redis is unreachable.
//!
//! [`OnRedisDown::FailClosed`] makes no large call: no cap can be passed, and the route serves its
//! small model (or refuses, for a fixed route) until Redis answers. [`OnRedisDown::FailOpen`] lets
//! each replica spend, on its own, `share` of what remained of each cap the last time it heard
//! from Redis, once per window; [`LocalShare`] keeps that account and hands the spend back for
//! Redis ([`LocalShare::take_unsynced`] → [`super::SharedStore::add_spent`]).
//!
//! Fail-open trades the cap for availability, within a bound. Spend made alone reaches Redis only
//! when its replica does; until then the other replicas cannot see it, so a cap can be passed by
//! at most the local spend of the replicas that were cut off — each at most `share` of what
//! remained, so at most what remained when `share ≤ 1/replicas`. When Redis itself goes down,
//! every replica is cut off, the shares add up to at most what remained, and the overshoot is only
//! what replicas still reaching Redis reserve before the others' spend lands: push it before the
//! next shared reservation. (Holding the share in Redis ahead of time, as a lease, would make
//! this exact, at the price of budget held back while Redis is up.)

use super::Totals;
use std::collections::BTreeMap;
use std::sync::Mutex;
use tandem_core::{BudgetLimits, Micros};

/// `[server.shared] on_redis_down`: `{ mode = "fail_closed" }` (the default) or
/// `{ mode = "fail_open", share = 0.25 }`.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum OnRedisDown {
    /// No large calls while Redis is unreachable.
    #[default]
    FailClosed,
    /// This replica may spend `share` (0 < share ≤ 1) of what remained of each cap when it last
    /// heard from Redis, counted here until Redis returns.
    FailOpen { share: f64 },
}

impl OnRedisDown {
    /// Refuses a share that is not a number in (0, 1], naming the field.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            OnRedisDown::FailClosed => Ok(()),
            OnRedisDown::FailOpen { share } if share.is_finite() && share > 0.0 && share <= 1.0 => {
                Ok(())
            }
            OnRedisDown::FailOpen { share } => Err(format!(
                "on_redis_down.share = {share}: must be a number above 0 and at most 1"
            )),
        }
    }
}

/// Spend made locally in one window and not yet added to Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsynced {
    /// The window, in seconds since the Unix epoch.
    pub window_start: u64,
    pub calls: u64,
    /// Micro-dollars.
    pub micros: Micros,
}

/// A call reserved against the local share; settle or release it on the [`LocalShare`] that made it.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "settle or release it: an open local reservation holds part of the share"]
pub struct LocalHeld {
    window_start: u64,
    estimate: Micros,
}

impl LocalHeld {
    /// Micro-dollars reserved.
    pub fn estimate(&self) -> Micros {
        self.estimate
    }

    pub fn window_start(&self) -> u64 {
        self.window_start
    }
}

#[derive(Debug, Default)]
struct LocalWindow {
    /// The window's totals in Redis when last heard.
    seen: Option<Totals>,
    open_calls: u64,
    open_micros: Micros,
    /// Settled locally this window, pushed or not: the share is used once per window, however
    /// often Redis comes and goes.
    used_calls: u64,
    used_micros: Micros,
    unsynced_calls: u64,
    unsynced_micros: Micros,
}

impl LocalWindow {
    fn idle(&self) -> bool {
        self.open_calls == 0 && self.unsynced_calls == 0 && self.unsynced_micros == 0
    }
}

/// One route's budget on this replica while Redis is down. Thread-safe.
#[derive(Debug)]
pub struct LocalShare {
    limits: BudgetLimits,
    on_down: OnRedisDown,
    windows: Mutex<BTreeMap<u64, LocalWindow>>,
}

/// `share` of `cap − seen`, rounded down; None for no cap.
fn share_of(cap: Option<u64>, seen: u64, share: f64) -> Option<u64> {
    cap.map(|c| (c.saturating_sub(seen) as f64 * share).floor() as u64)
}

impl LocalShare {
    /// `limits`: the route's caps (the whole cap, shared by every replica).
    pub fn new(limits: BudgetLimits, on_down: OnRedisDown) -> Self {
        LocalShare {
            limits,
            on_down,
            windows: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, LocalWindow>> {
        // Every change below is a few integer updates that cannot panic half-way.
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the window's totals as Redis last reported them (every reserve, settle and
    /// release answer carries them): the share is of what remained then.
    pub fn observe(&self, window_start: u64, totals: Totals) {
        let mut w = self.lock();
        w.entry(window_start).or_default().seen = Some(totals);
        prune(&mut w);
    }

    /// What this replica may still spend alone in the window: (calls, micro-dollars), None for
    /// no cap; (0, 0) when failing closed.
    pub fn remaining(&self, window_start: u64) -> (Option<u64>, Option<Micros>) {
        let w = self.lock();
        let empty = LocalWindow::default();
        self.remaining_in(w.get(&window_start).unwrap_or(&empty))
    }

    fn remaining_in(&self, lw: &LocalWindow) -> (Option<u64>, Option<Micros>) {
        let share = match self.on_down {
            OnRedisDown::FailClosed => return (Some(0), Some(0)),
            OnRedisDown::FailOpen { share } => share,
        };
        let seen = lw.seen.unwrap_or_default();
        let calls = share_of(self.limits.max_calls, seen.calls, share)
            .map(|a| a.saturating_sub(lw.used_calls + lw.open_calls));
        let micros = share_of(self.limits.max_micros, seen.micros, share)
            .map(|a| a.saturating_sub(lw.used_micros.saturating_add(lw.open_micros)));
        (calls, micros)
    }

    /// Reserves one call of `estimate` micro-dollars against the local share, or None (always,
    /// when failing closed).
    pub fn try_reserve(&self, window_start: u64, estimate: Micros) -> Option<LocalHeld> {
        let mut w = self.lock();
        let lw = w.entry(window_start).or_default();
        let (calls, micros) = self.remaining_in(lw);
        if calls.is_some_and(|c| c < 1) || micros.is_some_and(|m| m < estimate) {
            return None;
        }
        lw.open_calls += 1;
        lw.open_micros = lw.open_micros.saturating_add(estimate);
        Some(LocalHeld {
            window_start,
            estimate,
        })
    }

    /// The call cost `actual` micro-dollars: it is used from the share and waits to be added to
    /// Redis.
    pub fn settle(&self, held: LocalHeld, actual: Micros) {
        let mut w = self.lock();
        let lw = w.entry(held.window_start).or_default();
        lw.open_calls = lw.open_calls.saturating_sub(1);
        lw.open_micros = lw.open_micros.saturating_sub(held.estimate);
        lw.used_calls += 1;
        lw.used_micros = lw.used_micros.saturating_add(actual);
        lw.unsynced_calls += 1;
        lw.unsynced_micros = lw.unsynced_micros.saturating_add(actual);
    }

    /// The call was not made: its estimate goes back to the share.
    pub fn release(&self, held: LocalHeld) {
        let mut w = self.lock();
        let lw = w.entry(held.window_start).or_default();
        lw.open_calls = lw.open_calls.saturating_sub(1);
        lw.open_micros = lw.open_micros.saturating_sub(held.estimate);
        prune(&mut w);
    }

    /// Takes the settled local spend not yet in Redis, per window, oldest first, for
    /// [`super::SharedStore::add_spent`]. Give back what could not be added with
    /// [`LocalShare::restore_unsynced`]. Calls still open are taken once they settle.
    pub fn take_unsynced(&self) -> Vec<Unsynced> {
        let mut w = self.lock();
        let out = w
            .iter_mut()
            .filter(|(_, lw)| lw.unsynced_calls > 0 || lw.unsynced_micros > 0)
            .map(|(start, lw)| Unsynced {
                window_start: *start,
                calls: std::mem::take(&mut lw.unsynced_calls),
                micros: std::mem::take(&mut lw.unsynced_micros),
            })
            .collect();
        prune(&mut w);
        out
    }

    /// What this replica spent alone in the window (settled local calls, added to Redis or not):
    /// (calls, micro-dollars).
    pub fn spent_locally(&self, window_start: u64) -> (u64, Micros) {
        self.lock()
            .get(&window_start)
            .map_or((0, 0), |lw| (lw.used_calls, lw.used_micros))
    }

    /// True while spend made here waits to be added to Redis.
    pub fn has_unsynced(&self) -> bool {
        self.lock()
            .values()
            .any(|lw| lw.unsynced_calls > 0 || lw.unsynced_micros > 0)
    }

    /// Puts back spend that [`LocalShare::take_unsynced`] gave but Redis did not take.
    pub fn restore_unsynced(&self, u: Unsynced) {
        let mut w = self.lock();
        let lw = w.entry(u.window_start).or_default();
        lw.unsynced_calls += u.calls;
        lw.unsynced_micros = lw.unsynced_micros.saturating_add(u.micros);
    }
}

/// Forgets windows older than the newest once nothing in them is open or waiting for Redis.
fn prune(w: &mut BTreeMap<u64, LocalWindow>) {
    let Some(newest) = w.keys().next_back().copied() else {
        return;
    };
    w.retain(|start, lw| *start == newest || !lw.idle());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(calls: Option<u64>, micros: Option<u64>) -> BudgetLimits {
        BudgetLimits {
            max_calls: calls,
            max_micros: micros,
        }
    }

    fn open(share: f64) -> OnRedisDown {
        OnRedisDown::FailOpen { share }
    }

    /// Reserves `estimate` until refused; settles each at `actual`. Returns (calls, micros).
    fn drain(s: &LocalShare, window: u64, estimate: u64, actual: u64) -> (u64, u64) {
        let (mut calls, mut micros) = (0, 0);
        while let Some(h) = s.try_reserve(window, estimate) {
            s.settle(h, actual);
            calls += 1;
            micros += actual;
            assert!(calls < 1_000_000, "no cap stopped it");
        }
        (calls, micros)
    }

    #[test]
    fn failing_closed_allows_nothing() {
        for l in [
            limits(Some(100), None),
            limits(None, Some(1_000_000)),
            limits(Some(1), Some(1)),
        ] {
            let s = LocalShare::new(l, OnRedisDown::FailClosed);
            assert_eq!(s.try_reserve(0, 0), None);
            assert_eq!(s.try_reserve(60, 1), None);
            assert_eq!(s.remaining(0), (Some(0), Some(0)));
        }
    }

    #[test]
    fn failing_open_allows_the_share_of_what_remained() {
        // (calls cap, micros cap, share, seen calls, seen micros, estimate, actual) → calls, micros.
        let cases = [
            (Some(100), None, 0.25, 0, 0, 10, 10, 25, 250),
            (Some(100), None, 0.25, 60, 0, 10, 10, 10, 100),
            (None, Some(10_000), 0.5, 3, 4_000, 1_000, 900, 3, 2_700),
            (Some(10), Some(10_000), 1.0, 0, 0, 100, 100, 10, 1_000),
            (Some(10), Some(10_000), 1.0, 0, 9_950, 100, 100, 0, 0),
            (Some(3), Some(10_000), 0.3, 0, 0, 1, 1, 0, 0),
        ];
        for (mc, mm, share, sc, sm, est, act, want_calls, want_micros) in cases {
            let s = LocalShare::new(limits(mc, mm), open(share));
            s.observe(
                120,
                Totals {
                    calls: sc,
                    micros: sm,
                },
            );
            let got = drain(&s, 120, est, act);
            assert_eq!(got, (want_calls, want_micros), "{mc:?} {mm:?} {share}");
        }
    }

    #[test]
    fn open_reservations_hold_the_share_and_releases_give_it_back() {
        let s = LocalShare::new(limits(Some(8), Some(1_000)), open(0.5));
        let a = s.try_reserve(0, 300).unwrap();
        assert!(s.try_reserve(0, 300).is_none(), "300 + 300 > 500");
        s.release(a);
        let b = s.try_reserve(0, 300).unwrap();
        let c = s.try_reserve(0, 200).unwrap();
        assert_eq!(s.remaining(0), (Some(2), Some(0)));
        s.settle(b, 100);
        s.settle(c, 0);
        assert_eq!(s.remaining(0), (Some(2), Some(400)));
    }

    #[test]
    fn spend_waits_for_redis_once_and_the_share_is_used_once_per_window() {
        let s = LocalShare::new(limits(Some(100), Some(1_000_000)), open(0.1));
        let (calls, micros) = drain(&s, 60, 5_000, 4_000);
        assert_eq!((calls, micros), (10, 40_000));
        // A new window during the outage: a fresh share.
        let (calls2, _) = drain(&s, 120, 1_000, 1_000);
        assert_eq!(calls2, 10);
        let u = s.take_unsynced();
        assert_eq!(
            u,
            vec![
                Unsynced {
                    window_start: 60,
                    calls: 10,
                    micros: 40_000
                },
                Unsynced {
                    window_start: 120,
                    calls: 10,
                    micros: 10_000
                }
            ]
        );
        assert!(s.take_unsynced().is_empty(), "taken once");
        // Redis took the first, not the second.
        s.restore_unsynced(u[1]);
        assert_eq!(s.take_unsynced(), vec![u[1]]);
        // Redis back and gone again in the same window: no second share.
        assert!(s.try_reserve(120, 1).is_none());
    }

    #[test]
    fn old_windows_are_forgotten_once_idle() {
        let s = LocalShare::new(limits(Some(10), None), open(1.0));
        let held = s.try_reserve(0, 1).unwrap();
        s.observe(60, Totals::default());
        s.observe(120, Totals::default());
        assert_eq!(s.lock().len(), 2, "window 0 has a call open; 60 is idle");
        s.settle(held, 1);
        let _ = s.take_unsynced();
        assert_eq!(s.lock().keys().copied().collect::<Vec<_>>(), vec![120]);
    }

    #[test]
    fn shares_outside_zero_to_one_are_refused() {
        for share in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
            assert!(open(share).validate().is_err(), "{share}");
        }
        for share in [0.01, 0.5, 1.0] {
            assert!(open(share).validate().is_ok());
        }
        assert!(OnRedisDown::FailClosed.validate().is_ok());
    }

    #[test]
    fn the_config_shape() {
        #[derive(serde::Deserialize)]
        struct S {
            on_redis_down: OnRedisDown,
        }
        let s: S =
            toml::from_str("on_redis_down = { mode = \"fail_open\", share = 0.25 }").unwrap();
        assert_eq!(s.on_redis_down, open(0.25));
        let s: S = toml::from_str("on_redis_down = { mode = \"fail_closed\" }").unwrap();
        assert_eq!(s.on_redis_down, OnRedisDown::FailClosed);
        assert!(toml::from_str::<S>("on_redis_down = { mode = \"maybe\" }").is_err());
    }
}
