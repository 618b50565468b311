//! The final report of a run: accuracy, who answered what, and what the cascade saved against
//! sending everything to the top tier (in dollars at the configured prices and in measured
//! compute seconds). Scripts read `items`, `accuracy`, `top_share` and `tiers[].{name, share,
//! accuracy_alone}`.

use crate::live::RunState;
use serde::Serialize;
use std::fmt::Write;
use tandem_core::money::micros_to_usd;

#[derive(Debug, Clone, Serialize)]
pub struct TierReport {
    pub name: String,
    pub share: f64,
    pub answered: u64,
    pub predicted: u64,
    /// Accuracy against gold of this tier's own predictions, on the items it predicted on.
    pub accuracy_alone: Option<f64>,
    /// Agreement with the top tier on items both ran on.
    pub agreement_with_top: Option<f64>,
    pub ms_per_item: f64,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub items: u64,
    pub accuracy: Option<f64>,
    pub top_share: f64,
    pub tiers: Vec<TierReport>,
    pub cost_usd: f64,
    pub top_only_cost_usd: f64,
    pub saved_usd: f64,
    pub compute_s: f64,
    pub top_only_compute_s: f64,
    pub saved_compute_s: f64,
    pub budget_refused: u64,
    pub truncated_inputs: usize,
}

/// A saving that prints as zero at `half_unit` (half the last printed digit) is 0, not "-0.0".
fn tidy(x: f64, half_unit: f64) -> f64 {
    if x.abs() < half_unit {
        0.0
    } else {
        x
    }
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

impl RunReport {
    pub fn new(state: &RunState, truncated_inputs: usize) -> Self {
        let n = state.items_done.max(1) as f64;
        let tiers: Vec<TierReport> = state
            .tiers
            .iter()
            .map(|t| TierReport {
                name: t.name.clone(),
                share: t.answered as f64 / n,
                answered: t.answered,
                predicted: t.predicted,
                accuracy_alone: ratio(t.correct, t.with_gold),
                agreement_with_top: ratio(t.agree_top, t.with_top),
                ms_per_item: if t.predicted > 0 {
                    t.compute_us as f64 / 1000.0 / t.predicted as f64
                } else {
                    0.0
                },
                cost_usd: micros_to_usd(t.cost_micros),
            })
            .collect();
        let top = state.tiers.last().cloned().unwrap_or_default();
        let cost: u64 = state.tiers.iter().map(|t| t.cost_micros).sum();
        let compute: u64 = state.tiers.iter().map(|t| t.compute_us).sum();
        // Top-only: every item at the top tier's measured mean cost and compute per call.
        let per_top_cost = if top.predicted > 0 {
            top.cost_micros as f64 / top.predicted as f64
        } else {
            0.0
        };
        let per_top_us = if top.predicted > 0 {
            top.compute_us as f64 / top.predicted as f64
        } else {
            0.0
        };
        let top_only_cost = per_top_cost * state.items_done as f64 / 1e6;
        let top_only_s = per_top_us * state.items_done as f64 / 1e6;
        RunReport {
            items: state.items_done,
            accuracy: ratio(state.correct, state.with_gold),
            top_share: top.answered as f64 / n,
            tiers,
            cost_usd: micros_to_usd(cost),
            top_only_cost_usd: top_only_cost,
            saved_usd: top_only_cost - micros_to_usd(cost),
            compute_s: compute as f64 / 1e6,
            top_only_compute_s: top_only_s,
            saved_compute_s: top_only_s - compute as f64 / 1e6,
            budget_refused: state.budget_refused,
            truncated_inputs,
        }
    }

    pub fn table(&self) -> String {
        let pct =
            |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{:.1}%", 100.0 * v));
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} items; accuracy {}; top-tier share {:.1}%",
            self.items,
            pct(self.accuracy),
            100.0 * self.top_share
        );
        let _ = writeln!(
            s,
            "{:<12} {:>8} {:>9} {:>10} {:>14} {:>10} {:>10}",
            "tier", "share", "answered", "acc alone", "agree w/ top", "ms/item", "cost $"
        );
        for t in &self.tiers {
            let _ = writeln!(
                s,
                "{:<12} {:>7.1}% {:>9} {:>10} {:>14} {:>10.2} {:>10.4}",
                t.name,
                100.0 * t.share,
                t.answered,
                pct(t.accuracy_alone),
                pct(t.agreement_with_top),
                t.ms_per_item,
                t.cost_usd
            );
        }
        let _ = writeln!(
            s,
            "cost ${:.4} vs ${:.4} top-tier only (saved ${:.4}); compute {:.1} s vs {:.1} s top-tier only (saved {:.1} s)",
            self.cost_usd, self.top_only_cost_usd, tidy(self.saved_usd, 5e-5), self.compute_s, self.top_only_compute_s, tidy(self.saved_compute_s, 0.05)
        );
        if self.budget_refused > 0 {
            let _ = writeln!(
                s,
                "the budget refused {} top-tier calls (a cheap tier answered them)",
                self.budget_refused
            );
        }
        if self.truncated_inputs > 0 {
            let _ = writeln!(
                s,
                "{} inputs were truncated to [input] max_chars",
                self.truncated_inputs
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::tidy;

    #[test]
    fn savings_that_print_as_zero_have_no_sign() {
        for (x, half, want) in [
            (-0.01, 0.05, "0.0"),
            (-0.0, 0.05, "0.0"),
            (-0.07, 0.05, "-0.1"),
            (0.04, 0.05, "0.0"),
            (12.34, 0.05, "12.3"),
        ] {
            assert_eq!(format!("{:.1}", tidy(x, half)), want, "{x}");
        }
        assert_eq!(format!("{:.4}", tidy(-0.00001, 5e-5)), "0.0000");
    }
}
