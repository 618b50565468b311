//! From score to the route wanted: exploration, then the target share (or a fixed threshold).
//! The hard budget is not the gate's: the cascade engine checks it at every metered step up, so
//! nothing a policy or a target says can pass it; the gate then records what happened.

use crate::calibrate::ShareController;
use crate::error::CoreError;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateConfig {
    /// Share of queries to send to the strong model, exploration included.
    pub target_share: f64,
    /// Share of queries on which both models are called so that both outcomes are learned.
    pub explore: f64,
    /// How many recent scores the threshold is taken from.
    pub window: usize,
    pub seed: u64,
}

/// Where a query goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Weak,
    Strong,
    /// Both models are called (an exploration): both are paid, both outcomes are learned.
    Both,
}

#[derive(Debug, Clone)]
pub struct Gate {
    share: ShareController,
    explore: f64,
    base: f64,
    /// Escalate above this score instead of holding a share.
    fixed: Option<f32>,
    rng: ChaCha8Rng,
}

impl Gate {
    pub fn new(cfg: GateConfig) -> Result<Self, CoreError> {
        if !(0.0..=1.0).contains(&cfg.explore) {
            return Err(CoreError::config(
                "explore",
                cfg.explore,
                "must be between 0 and 1",
            ));
        }
        let share = ShareController::new(cfg.target_share, cfg.window)?;
        // Exploration spends part of the target; the scores route the rest of it.
        let explore = cfg.explore.min(cfg.target_share);
        let base = if explore >= 1.0 {
            0.0
        } else {
            ((cfg.target_share - explore) / (1.0 - explore)).clamp(0.0, 1.0)
        };
        Ok(Gate {
            share,
            explore,
            base,
            fixed: None,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
        })
    }

    /// A gate with a fixed threshold: escalate when the score exceeds it, explore at `explore`
    /// (both models called); the realised share is still tracked.
    pub fn fixed(threshold: f32, explore: f64, seed: u64) -> Result<Self, CoreError> {
        let mut g = Gate::new(GateConfig {
            target_share: explore,
            explore,
            window: 10,
            seed,
        })?;
        g.fixed = Some(threshold);
        Ok(g)
    }

    pub fn realised_share(&self) -> f64 {
        self.share.realised_share()
    }

    /// The share controller's state (recent scores, decisions so far), for checkpoints.
    pub fn share_controller(&self) -> &ShareController {
        &self.share
    }

    /// Restores a checkpointed controller, keeping this gate's target.
    pub fn restore_share_controller(&mut self, mut share: ShareController) {
        share.set_target(self.share.target());
        self.share = share;
    }

    /// The route the gate wants for `score` (exploration first, then the share) and the
    /// threshold it applied, before any budget (the engine checks it at every metered step up);
    /// [`Gate::record`] must follow with what happened.
    pub fn choose(&mut self, score: f32) -> (Route, f32) {
        let explore_draw: f64 = self.rng.gen();
        let tie_draw: f64 = self.rng.gen();
        let exploring = explore_draw < self.explore;
        let d = match self.fixed {
            Some(t) => crate::calibrate::ShareDecision {
                escalate: score > t,
                threshold: t,
            },
            None => self.share.decide(score, self.base, tie_draw),
        };
        let wanted = if exploring {
            Route::Both
        } else if d.escalate {
            Route::Strong
        } else {
            Route::Weak
        };
        (wanted, d.threshold)
    }

    /// Records a decision: whether the strong model was called after all (budget included).
    pub fn record(&mut self, score: f32, escalated: bool) {
        self.share.record(score, escalated);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Budget, BudgetLimits, Reservation};
    use crate::money::Micros;

    /// The gate's route, the budget asked (as the engine asks it) whenever the strong model
    /// would be called: the route taken, its reservation, and whether the budget refused.
    fn decide(
        g: &mut Gate,
        score: f32,
        budget: &Budget,
        estimate: Micros,
    ) -> (Route, Option<Reservation>, bool) {
        let (wanted, _) = g.choose(score);
        let (route, r, capped) = match wanted {
            Route::Weak => (Route::Weak, None, false),
            _ => match budget.try_reserve(estimate) {
                Some(r) => (wanted, Some(r), false),
                None => (Route::Weak, None, true),
            },
        };
        g.record(score, route != Route::Weak);
        (route, r, capped)
    }

    fn gate(target: f64, explore: f64) -> Gate {
        Gate::new(GateConfig {
            target_share: target,
            explore,
            window: 200,
            seed: 9,
        })
        .unwrap()
    }

    #[test]
    fn budget_wins_over_the_target() {
        let budget = Budget::new(BudgetLimits {
            max_calls: Some(5),
            max_micros: None,
        })
        .unwrap();
        let mut g = gate(1.0, 0.0);
        let mut strong = 0;
        for i in 0..100 {
            let (_, reservation, capped) = decide(&mut g, i as f32, &budget, 10);
            if let Some(r) = reservation {
                budget.settle(r, 10);
                strong += 1;
            } else {
                assert!(capped);
            }
        }
        assert_eq!(strong, 5);
        assert_eq!(budget.calls(), 5);
    }

    #[test]
    fn dollar_budget_boundary() {
        // 25 micro-dollars a call, cap 100: exactly four calls fit.
        let budget = Budget::new(BudgetLimits {
            max_calls: None,
            max_micros: Some(100),
        })
        .unwrap();
        let mut g = gate(1.0, 0.2);
        let mut n = 0;
        for i in 0..50 {
            if let (_, Some(r), _) = decide(&mut g, i as f32, &budget, 25) {
                budget.settle(r, 25);
                n += 1;
            }
        }
        assert_eq!(n, 4);
        assert_eq!(budget.spent_micros(), 100);
    }

    #[test]
    fn exploration_is_part_of_the_share() {
        let budget = Budget::unlimited();
        let mut g = gate(0.3, 0.1);
        let (mut both, mut strong) = (0, 0);
        for i in 0..10_000 {
            match decide(&mut g, (i % 97) as f32, &budget, 0).0 {
                Route::Both => both += 1,
                Route::Strong => strong += 1,
                Route::Weak => {}
            }
        }
        let share = (both + strong) as f64 / 10_000.0;
        assert!((share - 0.3).abs() < 0.01, "share {share}");
        assert!((both as f64 / 10_000.0 - 0.1).abs() < 0.01);
        // A target below the exploration rate caps exploration at the target.
        let mut g = gate(0.0, 0.1);
        assert!((0..1000).all(|i| decide(&mut g, i as f32, &budget, 0).0 == Route::Weak));
    }

    #[test]
    fn same_seed_same_decisions() {
        let budget = Budget::unlimited();
        let run = || {
            let mut g = gate(0.4, 0.1);
            (0..500)
                .map(|i| decide(&mut g, ((i * 37) % 101) as f32, &budget, 0).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn fixed_threshold_gate() {
        let budget = Budget::unlimited();
        let mut g = Gate::fixed(0.5, 0.0, 1).unwrap();
        assert_eq!(decide(&mut g, 0.6, &budget, 0).0, Route::Strong);
        assert_eq!(decide(&mut g, 0.4, &budget, 0).0, Route::Weak);
        assert!((g.realised_share() - 0.5).abs() < 1e-9);
        let one = Budget::new(BudgetLimits {
            max_calls: Some(1),
            max_micros: None,
        })
        .unwrap();
        let (route, r, _) = decide(&mut g, 0.9, &one, 0);
        assert_eq!(route, Route::Strong);
        one.settle(r.unwrap(), 0);
        let (route, _, capped) = decide(&mut g, 0.9, &one, 0);
        assert!(capped && route == Route::Weak);
    }
}
