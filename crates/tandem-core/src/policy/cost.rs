//! Cost-aware route-before routing: the router's expected quality gain from the strong model,
//! weighed by what the strong call would cost for this prompt. With weight 0 the score is the
//! gain alone (RouteLLM's routers); with weight 1 it is the gain per dollar, relative to the
//! mean cost of the prompts seen so far — so under a target share of strong calls, the share
//! goes where each dollar buys the most quality (the knapsack view of FrugalGPT, Chen, Zaharia
//! and Zou 2023, arXiv 2305.05176, §3). Between, the cost counts as (cost / mean)^weight.

use super::{Observation, RouteScorer};
use crate::query::Query;
use crate::tier::{estimate_tokens, Price};
use crate::Usage;

pub struct CostAware {
    inner: Box<dyn RouteScorer>,
    /// The strong model's price, and the output tokens an answer is assumed to take.
    price: Price,
    output_tokens: u64,
    weight: f32,
    /// Running sum and count of the strong call's estimated cost (micro-dollars) over the
    /// prompts seen so far, this one included: nothing later is peeked at.
    sum: f64,
    seen: u64,
}

impl CostAware {
    /// `weight` in [0, 1] (clamped): 0 gain alone, 1 gain per dollar.
    pub fn new(inner: Box<dyn RouteScorer>, price: Price, output_tokens: u64, weight: f32) -> Self {
        CostAware {
            inner,
            price,
            output_tokens,
            weight: weight.clamp(0.0, 1.0),
            sum: 0.0,
            seen: 0,
        }
    }

    /// The strong call's estimated cost for `q`, in micro-dollars (at least 1).
    fn cost(&self, q: &Query) -> f64 {
        let usage = Usage {
            input_tokens: estimate_tokens(q.routing_text().len()),
            output_tokens: self.output_tokens,
        };
        self.price.cost(usage).max(1) as f64
    }
}

impl RouteScorer for CostAware {
    fn score(&mut self, q: &Query) -> f32 {
        let gain = self.inner.score(q);
        let c = self.cost(q);
        self.sum += c;
        self.seen += 1;
        let relative = c / (self.sum / self.seen as f64);
        let factor = relative.powf(f64::from(self.weight)) as f32;
        // A gain shrinks with the price; a loss grows with it (never the other way round).
        if gain >= 0.0 {
            gain / factor
        } else {
            gain * factor
        }
    }

    fn learn(&mut self, q: &Query, observed: &Observation) {
        self.inner.learn(q, observed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same gain for every prompt.
    struct Flat(f32);

    impl RouteScorer for Flat {
        fn score(&mut self, _: &Query) -> f32 {
            self.0
        }
        fn learn(&mut self, _: &Query, _: &Observation) {}
    }

    /// With equal gains, a cost-aware score prefers the cheap prompt, in proportion to the
    /// weight; weight 0 is the gain alone; a loss is never made to look better by its price.
    #[test]
    fn equal_gains_prefer_the_cheaper_prompt() {
        let price = Price::Token {
            input_per_million: 10_000_000,
            output_per_million: 30_000_000,
        };
        let short = Query::text("s", "2+2?");
        let long = Query::text("l", "x".repeat(4000));
        for (weight, gain) in [(1.0, 0.5), (0.5, 0.5), (0.0, 0.5), (1.0, -0.5)] {
            let mut c = CostAware::new(Box::new(Flat(gain)), price, 10, weight);
            let (a, b) = (c.score(&short), c.score(&long));
            if weight == 0.0 {
                assert_eq!(a, b);
            } else if gain > 0.0 {
                assert!(a > b, "weight {weight}: short {a}, long {b}");
            } else {
                assert!(b < a && b < gain, "a loss on the dear prompt: {b}");
            }
        }
    }
}
