//! RouteLLM's quality metrics over a curve of (strong-call share, quality) points.
//!
//! PGR(c) = (q(c) − q_weak) / (q_strong − q_weak): how much of the gap between the weak and the
//! strong model a router recovers when it sends a share c of queries to the strong model.
//! APGR is the mean of PGR over a uniform grid of c in [0, 1]; CPT(x) is the smallest share whose
//! quality reaches q_weak + x·(q_strong − q_weak). Between measured points quality is linear.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvePoint {
    pub share: f64,
    pub quality: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Curve {
    points: Vec<CurvePoint>,
}

pub fn pgr(quality: f64, q_weak: f64, q_strong: f64) -> Option<f64> {
    let gap = q_strong - q_weak;
    (gap > 1e-12).then(|| (quality - q_weak) / gap)
}

impl Curve {
    /// Builds a curve from measured points in any order; points at the same share are averaged.
    /// Non-finite points are dropped.
    pub fn new(mut points: Vec<CurvePoint>) -> Self {
        points.retain(|p| p.share.is_finite() && p.quality.is_finite());
        points.sort_by(|a, b| a.share.total_cmp(&b.share));
        let mut merged: Vec<(CurvePoint, usize)> = Vec::with_capacity(points.len());
        for p in points {
            match merged.last_mut() {
                Some((m, n)) if (m.share - p.share).abs() < 1e-12 => {
                    m.quality = (m.quality * *n as f64 + p.quality) / (*n + 1) as f64;
                    *n += 1;
                }
                _ => merged.push((p, 1)),
            }
        }
        Curve {
            points: merged.into_iter().map(|(p, _)| p).collect(),
        }
    }

    pub fn points(&self) -> &[CurvePoint] {
        &self.points
    }

    /// Quality at `share`, linear between measured points and flat beyond the ends.
    pub fn quality_at(&self, share: f64) -> Option<f64> {
        let first = self.points.first()?;
        let last = self.points.last()?;
        if share <= first.share {
            return Some(first.quality);
        }
        if share >= last.share {
            return Some(last.quality);
        }
        let i = self.points.partition_point(|p| p.share <= share);
        let (a, b) = (self.points[i - 1], self.points[i]);
        let t = (share - a.share) / (b.share - a.share);
        Some(a.quality + t * (b.quality - a.quality))
    }

    /// Mean PGR over `grid` evenly spaced shares from 0 to 1 (both included).
    pub fn apgr(&self, q_weak: f64, q_strong: f64, grid: usize) -> Option<f64> {
        if grid < 2 || self.points.len() < 2 {
            return None;
        }
        let mut sum = 0.0;
        for i in 0..grid {
            let c = i as f64 / (grid - 1) as f64;
            sum += pgr(self.quality_at(c)?, q_weak, q_strong)?;
        }
        Some(sum / grid as f64)
    }

    /// Smallest share at which quality reaches q_weak + fraction·(q_strong − q_weak).
    pub fn cpt(&self, fraction: f64, q_weak: f64, q_strong: f64) -> Option<f64> {
        pgr(q_strong, q_weak, q_strong)?;
        let goal = q_weak + fraction * (q_strong - q_weak);
        let first = self.points.first()?;
        if first.quality >= goal - 1e-12 {
            return Some(first.share);
        }
        for w in self.points.windows(2) {
            let (a, b) = (w[0], w[1]);
            if b.quality >= goal - 1e-12 {
                let t = (goal - a.quality) / (b.quality - a.quality);
                return Some(a.share + t.clamp(0.0, 1.0) * (b.share - a.share));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(v: &[(f64, f64)]) -> Curve {
        Curve::new(
            v.iter()
                .map(|&(share, quality)| CurvePoint { share, quality })
                .collect(),
        )
    }

    #[test]
    fn hand_computed_example() {
        // Recovers the whole gap at half the strong calls.
        let c = pts(&[(1.0, 0.8), (0.0, 0.6), (0.5, 0.8)]);
        // Grid 0, .25, .5, .75, 1 → PGR 0, .5, 1, 1, 1 → mean 0.7.
        assert!((c.apgr(0.6, 0.8, 5).unwrap() - 0.7).abs() < 1e-12);
        // Grid 0, .5, 1 → 0, 1, 1.
        assert!((c.apgr(0.6, 0.8, 3).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((c.cpt(0.5, 0.6, 0.8).unwrap() - 0.25).abs() < 1e-12);
        assert!((c.cpt(0.8, 0.6, 0.8).unwrap() - 0.4).abs() < 1e-12);
        assert!((c.quality_at(0.1).unwrap() - 0.64).abs() < 1e-12);
    }

    #[test]
    fn random_routing_scores_one_half() {
        let c = pts(&[(0.0, 0.68), (1.0, 0.81)]);
        assert!((c.apgr(0.68, 0.81, 21).unwrap() - 0.5).abs() < 1e-12);
        assert!((c.cpt(0.5, 0.68, 0.81).unwrap() - 0.5).abs() < 1e-9);
        assert!((c.cpt(0.8, 0.68, 0.81).unwrap() - 0.8).abs() < 1e-9);
    }

    #[test]
    fn degenerate_cases() {
        assert_eq!(pgr(0.7, 0.7, 0.7), None);
        assert_eq!(pts(&[]).apgr(0.5, 0.6, 21), None);
        assert_eq!(pts(&[(0.0, 0.5)]).apgr(0.5, 0.6, 21), None);
        // Never reaches the goal.
        assert_eq!(pts(&[(0.0, 0.5), (1.0, 0.55)]).cpt(0.8, 0.5, 0.6), None);
        // Equal shares are averaged.
        assert_eq!(pts(&[(0.5, 0.6), (0.5, 0.8)]).points().len(), 1);
        assert!((pts(&[(0.5, 0.6), (0.5, 0.8)]).quality_at(0.5).unwrap() - 0.7).abs() < 1e-12);
    }
}
