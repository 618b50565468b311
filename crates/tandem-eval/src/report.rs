//! The evaluation table, as text for people and as JSON for scripts (keys are a contract: scripts
//! outside the project read `policies[].name`, `feedback`, `quality`, `strong_share`, `cost_usd`,
//! `apgr`, `cpt50`, `cpt80`, `decision_us_p50`, `decision_us_p99`).

use serde::Serialize;
use std::fmt::Write;
use tandem_core::metrics::CurvePoint;

#[derive(Debug, Clone, Serialize)]
pub struct PolicyRow {
    pub name: String,
    pub feedback: String,
    pub quality: f64,
    pub strong_share: f64,
    pub explore_share: f64,
    pub cost_usd: f64,
    pub capped: u64,
    pub apgr: Option<f64>,
    /// APGR over dollars between the weak and the strong model's spend alone
    /// ([`crate::eval::apgr_over_cost`]).
    pub apgr_cost: Option<f64>,
    pub cpt50: Option<f64>,
    pub cpt80: Option<f64>,
    pub decision_us_p50: f64,
    pub decision_us_p99: f64,
    /// The run holds a share and its `strong_share` is more than [`SHARE_TOLERANCE`] from the
    /// target: its quality and cost are not those of the target share.
    pub off_target: bool,
    pub curve: Vec<CurvePoint>,
    /// The same runs as `curve`, by what they spent.
    pub curve_cost: Vec<CostPoint>,
}

/// One run of a curve by its spend: dollars and quality.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CostPoint {
    pub cost_usd: f64,
    pub quality: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub data: String,
    pub items: usize,
    pub skipped_lines: usize,
    pub weak: String,
    pub strong: String,
    pub q_weak: f64,
    pub q_strong: f64,
    pub seed: u64,
    pub target_share: f64,
    pub explore: f64,
    pub grid: usize,
    pub max_strong_calls: Option<u64>,
    pub max_usd: Option<f64>,
    /// What the learned router read and started from: the records' metadata, an encoder's
    /// sentence vectors (its name), a prior (the files it was trained on); its weight on price.
    pub router_metadata: bool,
    pub router_vectors: Option<String>,
    pub prior_trained_on: Option<Vec<String>>,
    pub cost_weight: f32,
    /// What the weak and the strong model alone spend on the stream, uncapped: the ends of
    /// APGR$'s dollar axis and the references of the cost plot (none without curves).
    pub cost_weak_usd: Option<f64>,
    pub cost_strong_usd: Option<f64>,
    pub policies: Vec<PolicyRow>,
}

/// How far a run's realised strong (top-tier) share may be from its target before the table
/// flags it: the share controller settles within a point or two on a long stream.
pub const SHARE_TOLERANCE: f64 = 0.05;

/// Whether a share-holding run held `held` too far from `target` to stand for it.
pub fn off_target(held: f64, target: f64) -> bool {
    (held - target).abs() > SHARE_TOLERANCE
}

/// The footnote for a run that missed its share: why, as far as the run tells.
fn off_target_note(label: &str, held: f64, target: f64, capped: u64, items: usize) -> String {
    let why = if capped > 0 && held < target {
        format!("the hard cap refused {capped} escalations")
    } else {
        format!("the stream ({items} items) is too short for the share controller to settle")
    };
    format!(
        "* {label} held {:.1}% against a target of {:.0}%: {why}",
        100.0 * held,
        100.0 * target
    )
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{:.1}%", 100.0 * v))
}

impl EvalReport {
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: {} items; weak {} ({:.2}%), strong {} ({:.2}%); seed {}; operating share {:.0}%; partial-feedback exploration {:.0}%",
            self.data,
            self.items,
            self.weak,
            100.0 * self.q_weak,
            self.strong,
            100.0 * self.q_strong,
            self.seed,
            100.0 * self.target_share,
            100.0 * self.explore
        );
        if self.skipped_lines > 0 {
            let _ = writeln!(s, "skipped {} bad lines (--skip-bad)", self.skipped_lines);
        }
        let mut reads = vec!["n-grams"];
        if self.router_metadata {
            reads.push("metadata");
        }
        let vectors = self
            .router_vectors
            .as_deref()
            .map(|v| format!("{v} vectors"));
        if let Some(v) = &vectors {
            reads.push(v);
        }
        let _ = writeln!(
            s,
            "router reads {}; starts from {}; cost weight {}",
            reads.join(", "),
            self.prior_trained_on
                .as_ref()
                .map_or("nothing".to_string(), |f| format!(
                    "a prior trained on {}",
                    f.join(", ")
                )),
            self.cost_weight
        );
        if self.max_strong_calls.is_some() || self.max_usd.is_some() {
            let _ = writeln!(
                s,
                "hard cap: strong calls {}, spend {}",
                self.max_strong_calls.map_or("-".into(), |n| n.to_string()),
                self.max_usd.map_or("-".into(), |d| format!("${d:.4}"))
            );
        }
        let _ = writeln!(
            s,
            "{:<14} {:<8} {:>8} {:>9} {:>10} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9}",
            "policy",
            "feedback",
            "quality",
            "strong",
            "cost $",
            "APGR",
            "APGR$",
            "CPT50",
            "CPT80",
            "dec p50",
            "dec p99"
        );
        for r in &self.policies {
            let _ = writeln!(
                s,
                "{:<14} {:<8} {:>7.2}% {:>7.1}%{} {:>10.4} {:>7} {:>7} {:>7} {:>7} {:>7.2}us {:>7.2}us",
                r.name,
                r.feedback,
                100.0 * r.quality,
                100.0 * r.strong_share,
                if r.off_target { "*" } else { " " },
                r.cost_usd,
                r.apgr
                    .map_or_else(|| "-".to_string(), |a| format!("{a:.3}")),
                r.apgr_cost
                    .map_or_else(|| "-".to_string(), |a| format!("{a:.3}")),
                pct(r.cpt50),
                pct(r.cpt80),
                r.decision_us_p50,
                r.decision_us_p99,
            );
        }
        for r in self.policies.iter().filter(|r| r.off_target) {
            let label = format!("{} ({})", r.name, r.feedback);
            let note = off_target_note(
                &label,
                r.strong_share,
                self.target_share,
                r.capped,
                self.items,
            );
            let _ = writeln!(s, "{note}");
        }
        let capped: u64 = self.policies.iter().map(|r| r.capped).sum();
        if capped > 0 {
            let _ = writeln!(
                s,
                "the hard cap refused {capped} escalations at the operating points"
            );
        }
        s
    }
}

/// One model of an N-model file alone: the cascade's reference points.
#[derive(Debug, Clone, Serialize)]
pub struct LadderModel {
    pub name: String,
    pub quality: f64,
    /// What answering every item with it costs.
    pub cost_usd: f64,
    /// Its cost comes from the file's `cost` field rather than a price.
    pub recorded_cost: bool,
}

/// One run of a share-holding policy: a point of its frontier.
#[derive(Debug, Clone, Serialize)]
pub struct FrontierPoint {
    pub target_share: f64,
    pub top_share: f64,
    pub quality: f64,
    pub cost_usd: f64,
    /// Share of items each tier answered, cheapest first.
    pub answered: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LadderRow {
    pub name: String,
    pub feedback: String,
    pub quality: f64,
    pub top_share: f64,
    pub answered: Vec<f64>,
    pub cost_usd: f64,
    pub capped: u64,
    /// APGR over the top-share curve, between the cheapest and the top model alone.
    pub apgr: Option<f64>,
    pub decision_us_p50: f64,
    pub decision_us_p99: f64,
    /// The run holds a share and its `top_share` is more than [`SHARE_TOLERANCE`] from the
    /// target.
    pub off_target: bool,
    pub frontier: Vec<FrontierPoint>,
}

/// `tandem eval` over N models: the models (cheapest first), each policy's operating point and
/// frontier. JSON keys: `models[].{name, quality, cost_usd, recorded_cost}`, `policies[].{name,
/// feedback, quality, top_share, answered, cost_usd, capped, apgr, decision_us_p50,
/// decision_us_p99, frontier[].{target_share, top_share, quality, cost_usd, answered}}`.
#[derive(Debug, Clone, Serialize)]
pub struct LadderReport {
    pub data: String,
    pub items: usize,
    pub skipped_lines: usize,
    pub models: Vec<LadderModel>,
    pub seed: u64,
    pub target_share: f64,
    pub explore: f64,
    pub grid: usize,
    pub max_top_calls: Option<u64>,
    pub max_usd: Option<f64>,
    pub policies: Vec<LadderRow>,
}

impl LadderReport {
    fn label(r: &LadderRow) -> String {
        if r.feedback == "none" {
            r.name.clone()
        } else {
            format!("{} ({})", r.name, r.feedback)
        }
    }

    fn answered(a: &[f64]) -> String {
        a.iter()
            .map(|x| format!("{:.0}", 100.0 * x))
            .collect::<Vec<_>>()
            .join("/")
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: {} items; cascade of {} models, cheapest first; seed {}; operating top share {:.0}%; partial-feedback exploration {:.0}%",
            self.data,
            self.items,
            self.models.len(),
            self.seed,
            100.0 * self.target_share,
            100.0 * self.explore
        );
        if self.skipped_lines > 0 {
            let _ = writeln!(s, "skipped {} bad lines (--skip-bad)", self.skipped_lines);
        }
        if self.max_top_calls.is_some() || self.max_usd.is_some() {
            let _ = writeln!(
                s,
                "hard cap on the top tier: calls {}, spend {}",
                self.max_top_calls.map_or("-".into(), |n| n.to_string()),
                self.max_usd.map_or("-".into(), |d| format!("${d:.4}"))
            );
        }
        let _ = writeln!(
            s,
            "{:<4} {:<28} {:>8} {:>10}",
            "tier", "model alone", "quality", "cost $"
        );
        for (i, m) in self.models.iter().enumerate() {
            let _ = writeln!(
                s,
                "{:<4} {:<28} {:>7.2}% {:>10.4}{}",
                i,
                m.name,
                100.0 * m.quality,
                m.cost_usd,
                if m.recorded_cost { " (recorded)" } else { "" }
            );
        }
        let _ = writeln!(
            s,
            "{:<16} {:>8} {:>8} {:>12} {:>10} {:>7} {:>9} {:>9}",
            "policy", "quality", "top", "answered %", "cost $", "APGR", "dec p50", "dec p99"
        );
        for r in &self.policies {
            let _ = writeln!(
                s,
                "{:<16} {:>7.2}% {:>6.1}%{} {:>12} {:>10.4} {:>7} {:>7.2}us {:>7.2}us",
                Self::label(r),
                100.0 * r.quality,
                100.0 * r.top_share,
                if r.off_target { "*" } else { " " },
                Self::answered(&r.answered),
                r.cost_usd,
                r.apgr
                    .map_or_else(|| "-".to_string(), |a| format!("{a:.3}")),
                r.decision_us_p50,
                r.decision_us_p99,
            );
        }
        for r in self.policies.iter().filter(|r| r.off_target) {
            let note = off_target_note(
                &Self::label(r),
                r.top_share,
                self.target_share,
                r.capped,
                self.items,
            );
            let _ = writeln!(s, "{note}");
        }
        let _ = writeln!(
            s,
            "frontier (one online run per target top share; answered % per tier, cheapest first):"
        );
        for r in self.policies.iter().filter(|r| !r.frontier.is_empty()) {
            let _ = writeln!(
                s,
                "  {:<16} {:>7} {:>8} {:>7} {:>10} {:>12}",
                Self::label(r),
                "target",
                "quality",
                "top",
                "cost $",
                "answered %"
            );
            for f in &r.frontier {
                let _ = writeln!(
                    s,
                    "  {:<16} {:>6.0}% {:>7.2}% {:>6.1}% {:>10.4} {:>12}",
                    "",
                    100.0 * f.target_share,
                    100.0 * f.quality,
                    100.0 * f.top_share,
                    f.cost_usd,
                    Self::answered(&f.answered)
                );
            }
        }
        let capped: u64 = self.policies.iter().map(|r| r.capped).sum();
        if capped > 0 {
            let _ = writeln!(
                s,
                "the hard cap refused {capped} escalations at the operating points"
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, share: f64, capped: u64, holds: bool) -> PolicyRow {
        PolicyRow {
            name: name.into(),
            feedback: "full".into(),
            quality: 0.7,
            strong_share: share,
            explore_share: 0.0,
            cost_usd: 1.0,
            capped,
            apgr: None,
            apgr_cost: None,
            cpt50: None,
            cpt80: None,
            decision_us_p50: 1.0,
            decision_us_p99: 2.0,
            off_target: holds && off_target(share, 0.3),
            curve: Vec::new(),
            curve_cost: Vec::new(),
        }
    }

    #[test]
    fn a_share_off_its_target_is_flagged_with_why() {
        assert!(!off_target(0.3, 0.3) && !off_target(0.34, 0.3) && !off_target(0.26, 0.3));
        assert!(off_target(0.542, 0.3) && off_target(0.2, 0.3) && off_target(0.36, 0.3));
        let report = EvalReport {
            data: "d.jsonl".into(),
            items: 120,
            skipped_lines: 0,
            weak: "w".into(),
            strong: "s".into(),
            q_weak: 0.6,
            q_strong: 0.8,
            seed: 0,
            target_share: 0.3,
            explore: 0.1,
            grid: 5,
            max_strong_calls: None,
            max_usd: None,
            router_metadata: true,
            router_vectors: None,
            prior_trained_on: None,
            cost_weight: 0.0,
            cost_weak_usd: None,
            cost_strong_usd: None,
            policies: vec![
                row("always-strong", 1.0, 0, false),
                row("random", 0.31, 0, true),
                row("router", 0.542, 0, true),
                row("cascade", 0.12, 9, true),
            ],
        };
        let t = report.table();
        let line = |name: &str| {
            t.lines()
                .find(|l| l.starts_with(name) && l.contains(" full "))
                .unwrap_or_default()
        };
        assert!(!line("always-strong").contains('*'), "{t}");
        assert!(!line("random").contains('*'), "{t}");
        assert!(line("router").contains("54.2%*"), "{t}");
        assert!(line("cascade").contains("12.0%*"), "{t}");
        assert!(t.contains("* router (full) held 54.2% against a target of 30%: the stream (120 items) is too short for the share controller to settle"), "{t}");
        assert!(t.contains("* cascade (full) held 12.0% against a target of 30%: the hard cap refused 9 escalations"), "{t}");
        let json = serde_json::to_value(&report).unwrap_or_default();
        assert_eq!(json["policies"][2]["off_target"], true);
        assert_eq!(json["policies"][1]["off_target"], false);
    }
}
