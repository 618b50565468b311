//! Score, then gate: the two-model routers as the cascade engine's policy. A *route* scorer
//! ([`super::router`]) scores the query before any call and the [`Gate`] picks the entry tier
//! (route-before-generation, as RouteLLM's routers do: Ong et al., "RouteLLM: Learning to Route
//! LLMs with Preference Data", 2024, arXiv 2406.18665, its routing formulation with a cost
//! threshold); a *cascade* scorer ([`super::cascade`]) scores the cheap tier's answer and the gate
//! keeps or escalates it (cascade-after-generation). The gate holds the target share of top-tier
//! calls and explores (both tiers called, both outcomes revealed); the engine checks the budget.
//! The scorers learn from revealed outcomes ([`Deferral::learn_outcomes`]); built with
//! [`Gated::learning_from_top`], also from the top tier's answer whenever it answered after the
//! cheapest tier did (the cheap answer's graded agreement with it, and the top tier right).

use super::gate::{Gate, Route};
use super::{CascadeScorer, Deferral, Finished, ItemState, Observation, RouteScorer, Step};
use crate::answer::{Answer, Output, Usage};
use crate::query::Query;
use std::time::Duration;

/// What scores an item: the query alone, or the cheapest tier's answer too (by a learned
/// scorer, or by a signal the tier gave).
pub enum Scorer {
    Route(Box<dyn RouteScorer>),
    Cascade(Box<dyn CascadeScorer>),
    Signal(Signal),
}

/// A cheap tier's own signal, as a score (higher: send it up). A tier that gave no signal scores
/// infinite: unknown confidence cannot vouch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// −mean token log-probability: −ln of the geometric-mean token probability (the same
    /// order as the confidence shunt's), read exactly.
    MeanLogprob,
    /// E-LANG's generation form: the mean token energy.
    MeanEnergy,
}

impl Signal {
    pub fn score(self, step: &Step) -> f32 {
        match self {
            Signal::MeanLogprob => step.mean_logprob.map_or(f32::INFINITY, |m| -m),
            Signal::MeanEnergy => step.token_energy.unwrap_or(f32::INFINITY),
        }
    }
}

pub struct Gated {
    scorer: Scorer,
    gate: Gate,
    from_top: bool,
}

impl Gated {
    pub fn new(scorer: Scorer, gate: Gate) -> Self {
        Gated {
            scorer,
            gate,
            from_top: false,
        }
    }

    /// Also learns from the top tier's answer when the item ends: where both the cheapest tier
    /// and the top one answered (an escalation, or exploration), the cheapest answer's
    /// [`super::response::agreement`] with the top one is its outcome (graded, in [0, 1]) and
    /// the top tier counts as right — the gateway's teaching, where no outcome is recorded.
    pub fn learning_from_top(mut self) -> Self {
        self.from_top = true;
        self
    }

    fn learn(&mut self, item: &ItemState, query: &Query, o: &Observation) {
        match (&mut self.scorer, &item.weak) {
            (Scorer::Route(s), _) => s.learn(query, o),
            (Scorer::Cascade(s), Some(weak)) => s.learn(query, weak, o),
            (Scorer::Cascade(_), None) | (Scorer::Signal(_), _) => {}
        }
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }
}

impl Deferral for Gated {
    fn name(&self) -> &'static str {
        match self.scorer {
            Scorer::Route(_) => "route",
            Scorer::Cascade(_) => "cascade",
            Scorer::Signal(Signal::MeanLogprob) => "logprob",
            Scorer::Signal(Signal::MeanEnergy) => "energy",
        }
    }

    /// A route scorer decides here, before any call: the top tier for `Strong`.
    fn entry(&mut self, item: &mut ItemState, query: &Query, top: usize) -> usize {
        let Scorer::Route(s) = &mut self.scorer else {
            return 0;
        };
        item.score = s.score(query);
        let wanted = self.gate.choose(item.score).0;
        item.wanted = Some(wanted);
        item.explored = wanted == Route::Both;
        item.settled = wanted == Route::Weak;
        if wanted == Route::Strong {
            top
        } else {
            0
        }
    }

    fn defer(&mut self, item: &mut ItemState, step: &Step) -> bool {
        match &mut self.scorer {
            // Decided at the entry: the cheapest tier ran, so it answers unless exploring.
            Scorer::Route(_) => item.wanted == Some(Route::Both),
            Scorer::Cascade(s) => {
                let weak = Answer {
                    tier: String::new(),
                    output: Output::Text {
                        text: step.text.unwrap_or("").to_string(),
                        token_logprobs: step.token_logprobs.map(<[f32]>::to_vec),
                    },
                    usage: Usage::default(),
                    cost: 0,
                    compute: Duration::ZERO,
                };
                item.score = s.score(step.query, &weak);
                let wanted = self.gate.choose(item.score).0;
                item.wanted = Some(wanted);
                item.explored = wanted == Route::Both;
                item.weak = Some(weak);
                wanted != Route::Weak
            }
            Scorer::Signal(sig) => {
                item.score = sig.score(step);
                let wanted = self.gate.choose(item.score).0;
                item.wanted = Some(wanted);
                item.explored = wanted == Route::Both;
                wanted != Route::Weak
            }
        }
    }

    /// The gate counts what happened: the top tier called or not (the budget may have refused).
    /// Only items it decided: one whose cheap answer could not serve went up without a score,
    /// and would skew the share's window.
    fn end_item(&mut self, item: &ItemState, f: &Finished) {
        if item.wanted.is_some() {
            self.gate.record(item.score, f.answered == f.top);
        }
        if !self.from_top {
            return;
        }
        let cheapest = f.cheap.iter().find(|s| s.tier == 0).and_then(|s| s.text);
        if let (Some(top), Some(cheap)) = (f.top_text, cheapest) {
            let o = Observation {
                weak: Some(super::response::agreement(cheap, top)),
                strong: Some(1.0),
            };
            self.learn(item, f.query, &o);
        }
    }

    fn gate_mut(&mut self) -> Option<&mut Gate> {
        Some(&mut self.gate)
    }

    fn learn_outcomes(&mut self, item: &ItemState, f: &Finished, observed: &[Option<f32>]) {
        let o = Observation {
            weak: observed.first().copied().flatten(),
            strong: observed.last().copied().flatten(),
        };
        self.learn(item, f.query, &o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Budget, BudgetLimits};
    use crate::engine::{Cascade, Hint, Reply, Tiers};
    use crate::error::CoreError;
    use crate::policy::gate::GateConfig;
    use crate::policy::teaching::Teaching;
    use crate::Micros;

    /// Scores by the query's id: "hard" items high.
    struct ById;

    impl RouteScorer for ById {
        fn score(&mut self, q: &Query) -> f32 {
            if q.id.starts_with("hard") {
                1.0
            } else {
                0.0
            }
        }
        fn learn(&mut self, _: &Query, _: &Observation) {}
    }

    struct Two {
        called: Vec<usize>,
    }

    impl Tiers for Two {
        type Error = CoreError;
        fn count(&self) -> usize {
            2
        }
        fn estimate(&mut self, tier: usize, _: &Query) -> Micros {
            [1, 100][tier]
        }
        fn warm(&mut self, _: usize) -> bool {
            true
        }
        fn updates(&mut self, _: usize) -> u64 {
            0
        }
        fn answer(&mut self, tier: usize, _: &Query, _: Option<Hint>) -> Result<Reply, CoreError> {
            self.called.push(tier);
            Ok(Reply {
                cost: [1, 100][tier],
                ..Reply::generated(format!("tier {tier}"), None)
            })
        }
        fn learn(&mut self, _: usize, _: &str, _: usize, _: f32) -> Result<(), CoreError> {
            Ok(())
        }
    }

    /// Route-before through the engine: the hard half goes straight to the strong tier (the weak
    /// one is never called for it), the easy half stays weak; the budget caps the strong calls.
    #[test]
    fn a_route_scorer_picks_the_entry_tier_before_any_call() {
        let gate = Gate::new(GateConfig {
            target_share: 0.5,
            explore: 0.0,
            window: 100,
            seed: 1,
        })
        .unwrap();
        let mut c = Cascade::new(
            2,
            Box::new(Gated::new(Scorer::Route(Box::new(ById)), gate)),
            Teaching::default(),
        )
        .unwrap();
        let budget = Budget::new(BudgetLimits {
            max_calls: Some(300),
            max_micros: None,
        })
        .unwrap();
        let mut t = Two { called: Vec::new() };
        let mut strong_only = 0;
        for k in 0..1000 {
            let id = if k % 2 == 0 { "hard" } else { "easy" };
            let q = Query::text(format!("{id}{k}"), "x");
            let before = t.called.len();
            let s = c.serve(&mut t, &budget, &q).unwrap();
            if (100..500).contains(&k) && id == "hard" {
                assert_eq!(s.tier, 1, "item {k}");
            }
            if id == "easy" && k >= 100 {
                assert_eq!(s.tier, 0, "item {k}");
            }
            strong_only += usize::from(t.called[before..] == [1]);
        }
        assert_eq!(budget.calls(), 300);
        assert!(strong_only >= 250, "{strong_only}");
    }

    /// A signal scorer gates the cheapest tier's own log-probabilities: −mean log-probability
    /// against a fixed threshold, read exactly; no log-probabilities score infinite (go up).
    #[test]
    fn a_signal_scorer_gates_on_mean_logprob() {
        let gate = Gate::fixed(0.5, 0.0, 1).unwrap();
        let mut c = Cascade::new(
            2,
            Box::new(Gated::new(Scorer::Signal(Signal::MeanLogprob), gate)),
            Teaching::default(),
        )
        .unwrap();
        let q = Query::text("q", "x");
        for (lp, score, tier) in [
            (Some(vec![-0.1f32, -0.3]), 0.2f32, 0),
            (Some(vec![-1.0, -0.5]), 0.75, 1),
            (None, f32::INFINITY, 1),
        ] {
            let mut w = c.begin(&q, vec![1, 100]).unwrap();
            c.answered(&mut w, &q, Reply::generated("a".into(), lp), true);
            if let crate::engine::Next::Call { tier: 1, .. } = w.next() {
                c.answered(&mut w, &q, Reply::generated("b".into(), None), true);
            }
            let (s, _) = c.finish(&mut w, &q, |_| 0).unwrap();
            assert_eq!(s.tier, tier);
            assert!((w.item().score - score).abs() < 1e-6 || w.item().score == score);
        }
    }

    /// Records what it was taught.
    struct Taught(std::sync::Arc<std::sync::Mutex<Vec<(String, Observation)>>>);

    impl RouteScorer for Taught {
        fn score(&mut self, _: &Query) -> f32 {
            0.0
        }
        fn learn(&mut self, q: &Query, o: &Observation) {
            self.0.lock().unwrap().push((q.id.clone(), *o));
        }
    }

    /// Built `learning_from_top`, a route scorer learns from every item where the cheapest tier
    /// and the top one both answered (exploration): the cheap answer's graded agreement with the
    /// top one, the top right. Not from an item the top never answered, nor one the client
    /// would not have learned from. A cheap pick is settled at the entry: its call is the last.
    #[test]
    fn learning_from_top_teaches_the_explored_pairs_only() {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let gated = |explore: f64, target: f64| {
            let gate = Gate::new(GateConfig {
                target_share: target,
                explore,
                window: 100,
                seed: 3,
            })
            .unwrap();
            Cascade::new(
                2,
                Box::new(
                    Gated::new(Scorer::Route(Box::new(Taught(log.clone()))), gate)
                        .learning_from_top(),
                ),
                Teaching::default(),
            )
            .unwrap()
        };
        // Always exploring: both tiers answer; "4" against "the answer is 4" agrees (the final
        // numbers match), "5" does not.
        let mut c = gated(1.0, 1.0);
        for (id, cheap, learn) in [("a", "4", true), ("b", "5", true), ("c", "4", false)] {
            let q = Query::text(id, "x");
            let mut w = c.begin(&q, vec![1, 100]).unwrap();
            w.set_learning(learn);
            assert!(matches!(
                w.next(),
                crate::engine::Next::Call {
                    tier: 0,
                    last: false,
                    ..
                }
            ));
            c.answered(&mut w, &q, Reply::generated(cheap.into(), None), true);
            assert!(matches!(
                w.next(),
                crate::engine::Next::Call { tier: 1, .. }
            ));
            c.answered(
                &mut w,
                &q,
                Reply::generated("the answer is 4".into(), None),
                true,
            );
            let (s, _) = c.finish(&mut w, &q, |_| 0).unwrap();
            assert_eq!(s.tier, 1);
            assert!(s.explored);
        }
        let taught = log.lock().unwrap().clone();
        let weak: Vec<(&str, Option<f32>, Option<f32>)> = taught
            .iter()
            .map(|(id, o)| (id.as_str(), o.weak, o.strong))
            .collect();
        assert_eq!(
            weak,
            [("a", Some(1.0), Some(1.0)), ("b", Some(0.0), Some(1.0))]
        );
        // Never going up: the cheap pick is settled, its call the last, and nothing is taught.
        let mut c = gated(0.0, 0.0);
        let q = Query::text("d", "x");
        let mut w = c.begin(&q, vec![1, 100]).unwrap();
        assert!(matches!(
            w.next(),
            crate::engine::Next::Call {
                tier: 0,
                last: true,
                ..
            }
        ));
        c.answered(&mut w, &q, Reply::generated("4".into(), None), true);
        assert_eq!(w.next(), crate::engine::Next::Done);
        c.finish(&mut w, &q, |_| 0).unwrap();
        assert_eq!(log.lock().unwrap().len(), 2);
    }
}
