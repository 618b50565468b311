//! The benchmark's numbers: runs grouped by policy and knob (mean and spread over stream orders),
//! the table at the operating share, frontiers compared at equal top-tier share, and PGR against
//! the gap between the best cheap tier and the top tier.

use super::{Plan, RunResult, ALWAYS_TOP};
use serde::Serialize;
use tandem_core::metrics::{pgr, Curve, CurvePoint};
use tandem_core::stats::mean_sd;

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    pub accuracy: f64,
    pub accuracy_sd: f64,
    pub agreement: f64,
    pub top_share: f64,
    pub top_share_sd: f64,
    pub cost_usd: f64,
    pub compute_s: f64,
    /// Of the gap between the best cheap tier and the top tier, the share recovered.
    pub pgr: Option<f64>,
    pub seeds: usize,
}

/// A family's accuracy at one top-tier share; `None` (null) where some stream order's runs never
/// came within [`REACH_TOLERANCE`] of that share (e.g. below what a warm-up leaves to defer).
#[derive(Debug, Clone, Serialize)]
pub struct AtShare {
    pub family: String,
    pub share: f64,
    pub accuracy: Option<f64>,
    pub accuracy_sd: Option<f64>,
    pub pgr: Option<f64>,
}

/// How far outside a family's measured share range a comparison share may lie and still be
/// read off its curve: shares are held to about a point, so a run at 29.6% stands for 30%.
pub const REACH_TOLERANCE: f64 = 0.01;

#[derive(Debug, Clone, Serialize)]
pub struct S4lEffect {
    pub name: String,
    /// Items the top tier answered with S4L's help, summed over seeds.
    pub items: u64,
    /// The top tier's accuracy on those items with and without the hint; `None` (null) when
    /// there were none.
    pub top_accuracy_with: Option<f64>,
    pub top_accuracy_without: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FrontierPoint {
    pub knob: f64,
    pub top_share: f64,
    pub accuracy: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Frontier {
    pub family: String,
    pub points: Vec<FrontierPoint>,
    /// The smallest top-tier share at which the curve reaches the top tier's accuracy.
    pub share_for_top_accuracy: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatasetSummary {
    pub name: String,
    pub items: usize,
    pub seeds: Vec<u64>,
    pub top_accuracy: f64,
    /// The best cheap tier's accuracy when it predicts every item, learning from every item (from
    /// its top-tier answer or its gold label, as the cheap tiers are taught).
    pub best_cheap_accuracy: f64,
    pub best_cheap_tier: String,
    pub operating_share: f64,
    pub rows: Vec<Row>,
    pub at_share: Vec<AtShare>,
    pub s4l: Vec<S4lEffect>,
    pub frontiers: Vec<Frontier>,
}

fn group<'a>(runs: &'a [RunResult], family: &str, knob: f64) -> Vec<&'a RunResult> {
    runs.iter()
        .filter(|r| r.family == family && (r.knob - knob).abs() < 1e-9)
        .collect()
}

fn mean(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = v.collect();
    mean_sd(&v).unwrap_or((f64::NAN, f64::NAN))
}

fn row(name: String, rs: &[&RunResult], base: f64, top: f64) -> Row {
    let (accuracy, accuracy_sd) = mean(rs.iter().map(|r| r.accuracy));
    let (top_share, top_share_sd) = mean(rs.iter().map(|r| r.top_share));
    Row {
        pgr: pgr(accuracy, base, top),
        name,
        accuracy,
        accuracy_sd,
        agreement: mean(rs.iter().map(|r| r.agreement)).0,
        top_share,
        top_share_sd,
        cost_usd: mean(rs.iter().map(|r| r.cost_usd)).0,
        compute_s: mean(rs.iter().map(|r| r.compute_s)).0,
        seeds: rs.len(),
    }
}

/// Families in the order they were run, each once.
fn families(runs: &[RunResult]) -> Vec<&'static str> {
    let mut f: Vec<&'static str> = Vec::new();
    for r in runs {
        if !f.contains(&r.family) {
            f.push(r.family);
        }
    }
    f
}

fn knobs(runs: &[RunResult], family: &str) -> Vec<f64> {
    let mut k: Vec<f64> = Vec::new();
    for r in runs.iter().filter(|r| r.family == family) {
        if !k.iter().any(|x| (x - r.knob).abs() < 1e-9) {
            k.push(r.knob);
        }
    }
    k
}

pub fn summarize(
    name: &str,
    items: usize,
    tier_names: &[String],
    runs: &[RunResult],
    plan: &Plan,
) -> DatasetSummary {
    let always = group(runs, ALWAYS_TOP, 1.0);
    let top = mean(always.iter().map(|r| r.accuracy)).0;
    let cheap = tier_names.len().saturating_sub(1);
    let (best_i, base) = (0..cheap)
        .map(|i| {
            (
                i,
                mean(
                    always
                        .iter()
                        .filter_map(|r| r.tier_accuracy.get(i).copied()),
                )
                .0,
            )
        })
        .fold((0, f64::NEG_INFINITY), |b, x| if x.1 > b.1 { x } else { b });
    let op = plan.operating;
    let mut rows = Vec::new();
    let mut frontiers = Vec::new();
    let mut at_share = Vec::new();
    let mut s4l = Vec::new();
    for fam in families(runs) {
        let ks = knobs(runs, fam);
        if ks.len() > 1 {
            // A swept family: a frontier; the table shows its point nearest the operating share.
            let mut points: Vec<FrontierPoint> = ks
                .iter()
                .map(|&k| {
                    let g = group(runs, fam, k);
                    FrontierPoint {
                        knob: k,
                        top_share: mean(g.iter().map(|r| r.top_share)).0,
                        accuracy: mean(g.iter().map(|r| r.accuracy)).0,
                    }
                })
                .collect();
            points.sort_by(|a, b| a.top_share.total_cmp(&b.top_share));
            let curve = Curve::new(
                points
                    .iter()
                    .map(|p| CurvePoint {
                        share: p.top_share,
                        quality: p.accuracy,
                    })
                    .collect(),
            );
            let reaches = points.iter().any(|p| p.accuracy >= top);
            frontiers.push(Frontier {
                family: fam.to_string(),
                share_for_top_accuracy: if reaches {
                    curve.cpt(1.0, base, top)
                } else {
                    None
                },
                points: points.clone(),
            });
            for &s in &plan.compare_at {
                // Per stream order: that order's own curve at the share; then mean and spread.
                // Only where every order measured the share: beyond its runs a curve is flat,
                // which would report an accuracy at a share no run held.
                let per_seed: Option<Vec<f64>> = plan
                    .seeds
                    .iter()
                    .map(|&seed| {
                        let pts: Vec<CurvePoint> = runs
                            .iter()
                            .filter(|r| r.family == fam && r.seed == seed)
                            .map(|r| CurvePoint {
                                share: r.top_share,
                                quality: r.accuracy,
                            })
                            .collect();
                        if !reached(&pts, s) {
                            return None;
                        }
                        Curve::new(pts).quality_at(s)
                    })
                    .collect();
                let (a, sd) = match per_seed {
                    Some(v) if !v.is_empty() => {
                        let (a, sd) = mean(v.into_iter());
                        (Some(a), Some(sd))
                    }
                    _ => (None, None),
                };
                at_share.push(AtShare {
                    family: fam.to_string(),
                    share: s,
                    accuracy: a,
                    accuracy_sd: sd,
                    pgr: a.and_then(|a| pgr(a, base, top)),
                });
            }
            let Some(near) = points.iter().min_by(|a, b| {
                (a.top_share - op)
                    .abs()
                    .total_cmp(&(b.top_share - op).abs())
            }) else {
                continue;
            };
            let g = group(runs, fam, near.knob);
            rows.push(row(
                format!("{fam} ({})", knob_label(fam, near.knob)),
                &g,
                base,
                top,
            ));
        } else if let Some(&k) = ks.first() {
            let g = group(runs, fam, k);
            let label = if fam == ALWAYS_TOP || fam.ends_with(" alone") {
                fam.to_string()
            } else {
                format!("{fam} ({})", knob_label(fam, k))
            };
            let items: u64 = g.iter().map(|r| r.s4l_items).sum();
            if fam.contains("S4L") {
                let with: u64 = g.iter().map(|r| r.s4l_right_with).sum();
                let without: u64 = g.iter().map(|r| r.s4l_right_without).sum();
                let pct = |x: u64| (items > 0).then(|| x as f64 / items as f64);
                s4l.push(S4lEffect {
                    name: label.clone(),
                    items,
                    top_accuracy_with: pct(with),
                    top_accuracy_without: pct(without),
                });
            }
            rows.push(row(label, &g, base, top));
        }
    }
    DatasetSummary {
        name: name.to_string(),
        items,
        seeds: plan.seeds.clone(),
        top_accuracy: top,
        best_cheap_accuracy: base,
        best_cheap_tier: tier_names.get(best_i).cloned().unwrap_or_default(),
        operating_share: op,
        rows,
        at_share,
        s4l,
        frontiers,
    }
}

/// Whether runs at `points` came within [`REACH_TOLERANCE`] of `share` on both sides.
fn reached(points: &[CurvePoint], share: f64) -> bool {
    let lo = points.iter().map(|p| p.share).fold(f64::INFINITY, f64::min);
    let hi = points
        .iter()
        .map(|p| p.share)
        .fold(f64::NEG_INFINITY, f64::max);
    lo - REACH_TOLERANCE <= share && share <= hi + REACH_TOLERANCE
}

fn knob_label(family: &str, knob: f64) -> String {
    if family.contains("fixed threshold") {
        format!("threshold {knob:.2}")
    } else {
        format!("target {:.0}%", 100.0 * knob)
    }
}

/// The cheapest policy measured to reach `accuracy`: of every (family, knob) the runs swept but
/// the top tier alone, the one with the smallest mean top-tier share whose mean accuracy (over
/// stream orders) is at least `accuracy`. `base`, `top`: the best cheap tier's and the top
/// tier's accuracy (for the row's PGR). `None` when nothing reaches it.
pub fn cheapest_reaching(runs: &[RunResult], accuracy: f64, base: f64, top: f64) -> Option<Row> {
    families(runs)
        .into_iter()
        .filter(|f| *f != ALWAYS_TOP)
        .flat_map(|fam| {
            knobs(runs, fam).into_iter().map(move |k| {
                let g = group(runs, fam, k);
                let label = if fam.ends_with(" alone") {
                    fam.to_string()
                } else {
                    format!("{fam} ({})", knob_label(fam, k))
                };
                row(label, &g, base, top)
            })
        })
        .filter(|r| r.accuracy >= accuracy)
        .min_by(|a, b| {
            a.top_share
                .total_cmp(&b.top_share)
                .then(b.accuracy.total_cmp(&a.accuracy))
        })
}

impl DatasetSummary {
    /// The accuracy of `family` at `share` on its frontier, if it was swept and reached it.
    pub fn accuracy_at(&self, family: &str, share: f64) -> Option<f64> {
        self.at_share
            .iter()
            .find(|a| a.family == family && (a.share - share).abs() < 1e-9)
            .and_then(|a| a.accuracy)
    }

    pub fn table(&self) -> String {
        let pct = |x: f64| format!("{:.1}%", 100.0 * x);
        let mut s = format!(
            "{}: {} items, stream orders (seeds) {:?}; top tier {}, best cheap tier alone ({}) {}\n",
            self.name,
            self.items,
            self.seeds,
            pct(self.top_accuracy),
            self.best_cheap_tier,
            pct(self.best_cheap_accuracy)
        );
        s += &format!(
            "{:<46} {:>15} {:>8} {:>14} {:>9} {:>10} {:>6}\n",
            "policy", "accuracy ± sd", "agree", "top share", "cost $", "compute s", "PGR"
        );
        for r in &self.rows {
            let name = if r.seeds < self.seeds.len() {
                format!("{} [{} order]", r.name, r.seeds)
            } else {
                r.name.clone()
            };
            s += &format!(
                "{:<46} {:>8} ± {:>4.1} {:>8} {:>7} ± {:>4.1} {:>9.4} {:>10.1} {:>6}\n",
                name,
                pct(r.accuracy),
                100.0 * r.accuracy_sd,
                pct(r.agreement),
                pct(r.top_share),
                100.0 * r.top_share_sd,
                r.cost_usd,
                r.compute_s,
                r.pgr.map_or("-".into(), |p| format!("{p:.2}"))
            );
        }
        let shares: Vec<f64> = {
            let mut v: Vec<f64> = Vec::new();
            for a in &self.at_share {
                if !v.iter().any(|x| (x - a.share).abs() < 1e-9) {
                    v.push(a.share);
                }
            }
            v
        };
        s += "\nat equal top-tier share (accuracy ± sd over stream orders, PGR):\n";
        s += &format!("{:<30}", "policy");
        for sh in &shares {
            s += &format!(" {:>22}", format!("at {:.0}%", 100.0 * sh));
        }
        s += &format!(" {:>14}\n", "top acc. at");
        for f in &self.frontiers {
            s += &format!("{:<30}", f.family);
            for sh in &shares {
                let cell = self
                    .at_share
                    .iter()
                    .find(|a| a.family == f.family && (a.share - sh).abs() < 1e-9)
                    .map_or("-".into(), |a| match (a.accuracy, a.accuracy_sd) {
                        (Some(acc), Some(sd)) => format!(
                            "{} ± {:.1} {}",
                            pct(acc),
                            100.0 * sd,
                            a.pgr.map_or("-".into(), |p| format!("{p:.2}"))
                        ),
                        _ => "not reached".into(),
                    });
                s += &format!(" {cell:>22}");
            }
            s += &format!(
                " {:>14}\n",
                f.share_for_top_accuracy.map_or("not reached".into(), pct)
            );
        }
        if self.at_share.iter().any(|a| a.accuracy.is_none()) {
            s += "(not reached: some stream order's runs of that policy never held that share)\n";
        }
        for e in &self.s4l {
            s += &match (e.top_accuracy_with, e.top_accuracy_without) {
                (Some(with), Some(without)) => format!(
                    "{}: on the {} items the top tier answered with S4L, its accuracy {} with vs {} without\n",
                    e.name,
                    e.items,
                    pct(with),
                    pct(without)
                ),
                _ => format!(
                    "{}: the top tier answered no item with S4L's hint, so there is no effect to measure\n",
                    e.name
                ),
            };
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(family: &'static str, knob: f64, seed: u64, share: f64, acc: f64) -> RunResult {
        RunResult {
            family,
            knob,
            seed,
            items: 100,
            accuracy: acc,
            agreement: acc,
            top_share: share,
            cost_usd: share,
            compute_s: 0.0,
            tier_accuracy: vec![0.6],
            tier_answered: vec![1.0 - share],
            s4l_items: 0,
            s4l_right_with: 0,
            s4l_right_without: 0,
        }
    }

    fn plan(seeds: Vec<u64>) -> Plan {
        Plan {
            seeds,
            shares: vec![0.2, 0.5, 0.8],
            thresholds: vec![],
            operating: 0.5,
            compare_at: vec![0.2, 0.3, 0.5, 0.9],
            s4l: false,
            s4l_seeds: 0,
            threads: 1,
            shuffle: true,
        }
    }

    /// Runs of a family whose shares, per seed, span `lo..=hi` (a warm-up that keeps the top
    /// tier busy raises `lo` above every target).
    fn family(name: &'static str, seeds: &[u64], lo: f64, hi: f64) -> Vec<RunResult> {
        let mut v = Vec::new();
        for &seed in seeds {
            for (i, knob) in [0.2, 0.5, 0.8].into_iter().enumerate() {
                let share = lo + (hi - lo) * i as f64 / 2.0;
                v.push(run(name, knob, seed, share, 0.6 + 0.3 * share));
            }
        }
        v
    }

    #[test]
    fn shares_no_run_held_are_not_reached() {
        let seeds = [0, 1];
        let mut runs = vec![
            run(ALWAYS_TOP, 1.0, 0, 1.0, 0.9),
            run(ALWAYS_TOP, 1.0, 1, 1.0, 0.9),
        ];
        // Held every share; held only 59%–85% (a warm-up); one order held 20%, the other not.
        runs.extend(family("wide", &seeds, 0.2, 0.8));
        runs.extend(family("warm", &seeds, 0.59, 0.85));
        runs.extend(family("mixed", &[0], 0.2, 0.8));
        runs.extend(family("mixed", &[1], 0.45, 0.8));
        let s = summarize(
            "d",
            100,
            &["a".into(), "b".into()],
            &runs,
            &plan(seeds.to_vec()),
        );
        let cases = [
            ("wide", 0.2, true),
            ("wide", 0.3, true),
            ("wide", 0.5, true),
            ("wide", 0.9, false),
            ("warm", 0.2, false),
            ("warm", 0.3, false),
            ("warm", 0.5, false),
            ("mixed", 0.2, false),
            ("mixed", 0.5, true),
        ];
        for (fam, share, reach) in cases {
            assert_eq!(
                s.accuracy_at(fam, share).is_some(),
                reach,
                "{fam} at {share}"
            );
        }
        // Within the tolerance of the lowest run's share counts as reached.
        let near = family("near", &[0, 1], 0.305, 0.8);
        let s2 = summarize(
            "d",
            100,
            &["a".into(), "b".into()],
            &[runs.clone(), near].concat(),
            &plan(seeds.to_vec()),
        );
        assert!(s2.accuracy_at("near", 0.3).is_some());
        let table = s.table();
        // The equal-share table's line (the rows table above has one too).
        let warm = table
            .lines()
            .rfind(|l| l.starts_with("warm "))
            .unwrap_or_default();
        assert_eq!(warm.matches("not reached").count(), 5, "{warm}");
        assert!(table.contains("(not reached: some stream order"), "{table}");
        let json = serde_json::to_value(&s).unwrap_or_default();
        let cell = json["at_share"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|a| a["family"] == "warm" && a["share"] == 0.3)
            })
            .cloned()
            .unwrap_or_default();
        assert!(
            cell["accuracy"].is_null() && cell["pgr"].is_null(),
            "{cell}"
        );
    }

    #[test]
    fn s4l_without_items_says_so() {
        let mut runs = vec![run(ALWAYS_TOP, 1.0, 0, 1.0, 0.9)];
        let mut none = run("DS+ shunt + S4L hard", 0.3, 0, 0.3, 0.7);
        runs.push(none.clone());
        none.family = "OCL + S4L soft";
        none.s4l_items = 4;
        none.s4l_right_with = 3;
        none.s4l_right_without = 1;
        runs.push(none);
        let s = summarize("d", 100, &["a".into(), "b".into()], &runs, &plan(vec![0]));
        let table = s.table();
        assert!(!table.contains("NaN"), "{table}");
        assert!(
            table.contains(
                "DS+ shunt + S4L hard (target 30%): the top tier answered no item with S4L's hint"
            ),
            "{table}"
        );
        assert!(
            table.contains("on the 4 items the top tier answered with S4L, its accuracy 75.0% with vs 25.0% without"),
            "{table}"
        );
        assert_eq!(s.s4l[0].top_accuracy_with, None);
        assert_eq!(s.s4l[1].top_accuracy_with, Some(0.75));
    }
}
