//! Hard caps on calls to an expensive tier. A call is admitted only by reserving its estimated cost
//! first, so the cap holds whatever the policy or the share target wants, and under concurrency.

use crate::error::CoreError;
use crate::money::Micros;
use serde::{Deserialize, Serialize};
use std::sync::{Mutex, MutexGuard};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetLimits {
    /// At most this many calls.
    pub max_calls: Option<u64>,
    /// At most this many micro-dollars, counting reservations of calls in flight.
    pub max_micros: Option<Micros>,
}

impl BudgetLimits {
    /// Rejects caps of zero: a zero cap is almost always a typo, and "never call the expensive
    /// tier" is said with a target share of 0, not with a budget.
    pub fn validate(&self) -> Result<(), CoreError> {
        if self.max_calls == Some(0) {
            return Err(CoreError::config(
                "max_calls",
                0,
                "a cap of zero calls is not a budget; set the target share to 0 instead",
            ));
        }
        if self.max_micros == Some(0) {
            return Err(CoreError::config(
                "max_micros",
                0,
                "a cap of zero dollars is not a budget; set the target share to 0 instead",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Spent {
    calls: u64,
    micros: Micros,
}

/// A budget shared by every decision that may call the guarded tier.
#[derive(Debug)]
pub struct Budget {
    limits: BudgetLimits,
    spent: Mutex<Spent>,
}

/// Proof that a call's estimated cost was reserved. Settle it with the real cost, or release it if
/// the call did not happen.
#[derive(Debug)]
#[must_use = "a reservation must be settled or released"]
pub struct Reservation {
    estimate: Micros,
}

impl Reservation {
    /// The cost reserved, in micro-dollars.
    pub fn estimate(&self) -> Micros {
        self.estimate
    }
}

impl Budget {
    pub fn new(limits: BudgetLimits) -> Result<Self, CoreError> {
        limits.validate()?;
        Ok(Budget {
            limits,
            spent: Mutex::new(Spent::default()),
        })
    }

    /// A budget that has already spent `calls` calls and `micros` (e.g. before a restart).
    pub fn with_spent(limits: BudgetLimits, calls: u64, micros: Micros) -> Result<Self, CoreError> {
        let b = Budget::new(limits)?;
        *b.lock() = Spent { calls, micros };
        Ok(b)
    }

    pub fn unlimited() -> Self {
        Budget {
            limits: BudgetLimits::default(),
            spent: Mutex::new(Spent::default()),
        }
    }

    pub fn limits(&self) -> BudgetLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Spent> {
        // A poisoned lock only means another thread panicked mid-update of two integers that are
        // always left consistent; the counts are still right.
        self.spent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves one call costing `estimate`, or returns None when that would pass a cap.
    pub fn try_reserve(&self, estimate: Micros) -> Option<Reservation> {
        let mut s = self.lock();
        if let Some(max) = self.limits.max_calls {
            if s.calls >= max {
                return None;
            }
        }
        if let Some(max) = self.limits.max_micros {
            if s.micros.saturating_add(estimate) > max {
                return None;
            }
        }
        s.calls += 1;
        s.micros = s.micros.saturating_add(estimate);
        Some(Reservation { estimate })
    }

    /// Replaces the estimate by the real cost. A provider that charges more than estimated can push
    /// spend past the dollar cap by that difference; later reservations then see it and stop.
    pub fn settle(&self, r: Reservation, actual: Micros) {
        let mut s = self.lock();
        s.micros = s.micros.saturating_sub(r.estimate).saturating_add(actual);
    }

    /// Gives a reservation back: the call was not made.
    pub fn release(&self, r: Reservation) {
        let mut s = self.lock();
        s.calls = s.calls.saturating_sub(1);
        s.micros = s.micros.saturating_sub(r.estimate);
    }

    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    pub fn spent_micros(&self) -> Micros {
        self.lock().micros
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn call_cap_holds_at_the_boundary() {
        let b = Budget::new(BudgetLimits {
            max_calls: Some(3),
            max_micros: None,
        })
        .unwrap();
        let rs: Vec<_> = (0..3).map(|_| b.try_reserve(10).unwrap()).collect();
        assert!(b.try_reserve(0).is_none(), "fourth call must be refused");
        for r in rs {
            b.settle(r, 10);
        }
        assert_eq!(b.calls(), 3);
        assert!(b.try_reserve(0).is_none());
    }

    #[test]
    fn dollar_cap_holds_at_the_boundary() {
        let b = Budget::new(BudgetLimits {
            max_calls: None,
            max_micros: Some(100),
        })
        .unwrap();
        let r = b.try_reserve(60).unwrap();
        assert!(b.try_reserve(41).is_none(), "61+41 > 100");
        let r2 = b.try_reserve(40).unwrap(); // exactly 100 is allowed
        assert_eq!(b.spent_micros(), 100);
        b.settle(r, 50);
        b.release(r2);
        assert_eq!(b.spent_micros(), 50);
        assert_eq!(b.calls(), 1);
    }

    #[test]
    fn restored_budget_keeps_counting() {
        let b = Budget::with_spent(
            BudgetLimits {
                max_calls: Some(3),
                max_micros: None,
            },
            2,
            20,
        )
        .unwrap();
        assert!(b.try_reserve(1).is_some());
        assert!(b.try_reserve(1).is_none());
        assert_eq!(b.spent_micros(), 21);
    }

    #[test]
    fn zero_caps_are_rejected() {
        assert!(Budget::new(BudgetLimits {
            max_calls: Some(0),
            max_micros: None
        })
        .is_err());
        assert!(Budget::new(BudgetLimits {
            max_calls: None,
            max_micros: Some(0)
        })
        .is_err());
    }

    #[test]
    fn cap_holds_under_concurrency() {
        let b = Arc::new(
            Budget::new(BudgetLimits {
                max_calls: Some(50),
                max_micros: Some(1000),
            })
            .unwrap(),
        );
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut got = 0;
                    for _ in 0..100 {
                        if let Some(r) = b.try_reserve(7) {
                            b.settle(r, 7);
                            got += 1;
                        }
                    }
                    got
                })
            })
            .collect();
        let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(total <= 50);
        assert!(b.spent_micros() <= 1000);
        assert_eq!(total, b.calls());
    }
}
