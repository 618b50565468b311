//! What the share-holding gates have in common: one threshold for every priced step over a score
//! where higher means "send it up", held online so that a target share of the items reach the top
//! tier. An item goes up only when every priced step's score is above the threshold, so the share
//! controller watches the lowest of those scores along each item's path. (Splitting the share per
//! tier instead lets a weak first tier answer a fixed share whatever it knows.) The scores
//! themselves are the papers': E-LANG's energy ([`super::energy`]) and the DS+ shunt's max
//! probability ([`super::shunt`]).
//!
//! A step into a *free* tier (a hashed model under a local encoder) spends no share, so the
//! threshold does not decide there (issue 14, item 5): held to a low share it would have the
//! cheapest tier keep a large part of the stream however much better the free tier above is.
//! Instead the cheap tier keeps an item only when, on items scoring like it (the same quantile
//! bucket of its score), it disagrees with the top tier no more often than the tier above is
//! expected to — that tier's own error rate, calibrated per bucket of *its* score on the top
//! tier's labels (unbiased: which items the top labels depends on that score alone), averaged
//! over the items the cheap tier sent up (none where the item went on to the top tier). Both rates are learned from the top tier's labels;
//! a kept bucket still sends a tenth of its items up (free), so the comparison stays measured.
//! Where no next tier is free (the gateway's priced tiers) nothing of this runs.

use super::{Deferral, Finished, ItemState, Step};
use crate::calibrate::ShareController;
use crate::error::CoreError;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Which score a held gate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GateScore {
    /// E-LANG's energy E(x) = −T·logsumexp(f(x)/T): high when the logits are all small.
    Energy,
    /// 1 − max probability: the confidence shunt.
    MaxProb,
}

impl GateScore {
    fn score(self, step: &Step, temperature: f32) -> f32 {
        match self {
            GateScore::Energy => super::energy::score(step, temperature),
            GateScore::MaxProb => super::shunt::score(step),
        }
    }
}

/// A score held to a share of top-tier calls (its checkpoint is this struct as JSON).
#[derive(Serialize, Deserialize)]
pub struct ShareGates {
    pub score: GateScore,
    pub gate: ShareController,
    pub temperature: f32,
    pub rng_seed: u64,
    pub rng_pos: u128,
    /// What the steps below a free tier learned; absent from a checkpoint written before it
    /// (version 1), which loads with it empty (it refills within a few hundred items).
    #[serde(default)]
    pub free: FreeSteps,
    /// The checkpoint's layout: 1 before [`FreeSteps`], 2 with it.
    #[serde(default = "version_1")]
    pub version: u32,
    #[serde(skip, default = "new_rng")]
    rng: ChaCha8Rng,
}

fn new_rng() -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(0)
}

fn version_1() -> u32 {
    1
}

/// The checkpoint layout this build writes.
const VERSION: u32 = 2;

/// Score buckets below a free tier: quantiles of the tier's recent scores, so the same edges
/// serve energies (no fixed scale) and 1 − max probability.
const BUCKETS: usize = 8;
/// Recent scores per tier that the bucket edges are read from.
const WINDOW: usize = 500;
/// Per bucket: the decay of its rates (about its last 50 items) and the weight a rate needs
/// before it is trusted (until then the item goes up: that is free).
const RATE: f64 = 0.02;
const MIN_WEIGHT: f64 = 10.0;
/// Items a kept bucket still sends up to the free tier, so that what the tier above achieves
/// there keeps being measured (free: it costs no share, only the difference between the two).
const EXPLORE: f64 = 0.1;
/// Pseudo-count pulling a bucket's calibrated error towards the tier's own 1 − max probability
/// while the bucket has few labels (its surest buckets seldom reach the top).
const PRIOR_WEIGHT: f64 = 5.0;

/// Per cheap tier, below a free tier or under one: recent scores, and per bucket of its score
/// decayed [weight, Σ] of how often it disagreed with the top tier and of the tier above's
/// expected error on the items it sent up.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FreeSteps {
    recent: Vec<std::collections::VecDeque<f32>>,
    errors: Vec<[[f64; 2]; BUCKETS]>,
    above: Vec<[[f64; 2]; BUCKETS]>,
}

impl FreeSteps {
    fn grow(&mut self, tier: usize) {
        if self.recent.len() <= tier {
            self.recent.resize_with(tier + 1, Default::default);
            self.errors.resize(tier + 1, [[0.0; 2]; BUCKETS]);
            self.above.resize(tier + 1, [[0.0; 2]; BUCKETS]);
        }
    }

    /// `score`'s bucket among `tier`'s recent scores (the middle one before any).
    fn bucket(&self, tier: usize, score: f32) -> usize {
        let Some(r) = self.recent.get(tier).filter(|r| !r.is_empty()) else {
            return BUCKETS / 2;
        };
        let below = r.iter().filter(|&&s| s < score).count();
        (below * BUCKETS / r.len()).min(BUCKETS - 1)
    }

    fn push(&mut self, tier: usize, score: f32) {
        self.grow(tier);
        if let Some(r) = self.recent.get_mut(tier) {
            if r.len() == WINDOW {
                r.pop_front();
            }
            r.push_back(score);
        }
    }

    fn add(table: &mut [[[f64; 2]; BUCKETS]], tier: usize, bucket: usize, value: f64) {
        if let Some([w, sum]) = table.get_mut(tier).and_then(|t| t.get_mut(bucket)) {
            *w = (1.0 - RATE) * *w + 1.0;
            *sum = (1.0 - RATE) * *sum + value;
        }
    }

    fn rate(table: &[[[f64; 2]; BUCKETS]], tier: usize, bucket: usize) -> Option<f64> {
        let [w, sum] = *table.get(tier)?.get(bucket)?;
        (w >= MIN_WEIGHT).then(|| sum / w)
    }

    /// `tier`'s expected error at `bucket`: its disagreement with the top tier there, pulled
    /// towards `own` (its 1 − max probability) while the bucket has few labels.
    fn calibrated(&self, tier: usize, bucket: usize, own: f64) -> f64 {
        let [w, sum] = self
            .errors
            .get(tier)
            .and_then(|t| t.get(bucket))
            .copied()
            .unwrap_or([0.0; 2]);
        (sum + PRIOR_WEIGHT * own) / (w + PRIOR_WEIGHT)
    }
}

impl ShareGates {
    /// `target` of the items to the top tier; `seed` drives the tie-break draws.
    pub fn new(
        score: GateScore,
        target: f64,
        temperature: f32,
        seed: u64,
    ) -> Result<Self, CoreError> {
        Ok(ShareGates {
            score,
            gate: ShareController::new(target, 1000)?,
            temperature,
            rng_seed: seed,
            rng_pos: 0,
            free: FreeSteps::default(),
            version: VERSION,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// Below a free tier: go up unless this tier, on items scoring like this one, disagrees with
    /// the top tier no more often than the tier above is expected to (then still go up for a
    /// tenth of them, to keep measuring). Nothing learned yet: go up (it is free).
    fn defer_to_free(&mut self, item: &mut ItemState, tier: usize, score: f32) -> bool {
        let b = self.free.bucket(tier, score);
        let own = FreeSteps::rate(&self.free.errors, tier, b);
        let above = FreeSteps::rate(&self.free.above, tier, b);
        match (own, above) {
            (Some(own), Some(above)) if own <= above => {
                let explore = rand::Rng::gen::<f64>(&mut self.rng) < EXPLORE;
                item.explored |= explore;
                explore
            }
            _ => true,
        }
    }

    /// Learns from an item of a cascade with a free step: each cheap tier's disagreement with
    /// the top (when it answered) per bucket of its score, and, for each step into a free tier,
    /// that tier's expected error on the item, per bucket of the score of the tier below it.
    fn learn_free(&mut self, f: &Finished) {
        let scores: Vec<f32> = f
            .cheap
            .iter()
            .map(|s| self.score.score(s, self.temperature))
            .collect();
        for (s, &score) in f.cheap.iter().zip(&scores) {
            self.free.push(s.tier, score);
        }
        let buckets: Vec<usize> = f
            .cheap
            .iter()
            .zip(&scores)
            .map(|(s, &score)| self.free.bucket(s.tier, score))
            .collect();
        for ((s, &b), k) in f.cheap.iter().zip(&buckets).zip(0..) {
            if let Some(agreed) = f.agreed(s) {
                FreeSteps::add(
                    &mut self.free.errors,
                    s.tier,
                    b,
                    f64::from(u8::from(!agreed)),
                );
            }
            let up = f.cheap.get(k + 1).filter(|u| u.tier == s.tier + 1);
            if let (Some(up), Some(&bu)) = (up, buckets.get(k + 1)) {
                if s.next_cost <= 0.0 {
                    // What going up realised: the tier above's expected error when it answered,
                    // none when a tier above it did (the top's answer is the reference).
                    let e = if f.answered > up.tier {
                        0.0
                    } else {
                        let own = f64::from(1.0 - up.confidence).clamp(0.0, 1.0);
                        self.free.calibrated(up.tier, bu, own)
                    };
                    FreeSteps::add(&mut self.free.above, s.tier, b, e);
                }
            }
        }
    }
}

impl Deferral for ShareGates {
    fn name(&self) -> &'static str {
        match self.score {
            GateScore::Energy => "energy",
            GateScore::MaxProb => "max_prob",
        }
    }

    fn defer(&mut self, item: &mut ItemState, step: &Step) -> bool {
        let score = self.score.score(step, self.temperature);
        if step.next_cost <= 0.0 {
            // A free step spends no share: the threshold does not decide it, nor see it.
            item.decided = true;
            return self.defer_to_free(item, step.tier, score);
        }
        let draw = item.draw(&mut self.rng);
        let d = self.gate.decide(score, self.gate.target(), draw);
        item.record(score);
        d.escalate
    }

    fn end_item(&mut self, item: &ItemState, f: &Finished) {
        if f.cheap.iter().any(|s| s.next_cost <= 0.0) {
            self.learn_free(f);
        }
        match item.lowest {
            Some(m) => self.gate.record(m, f.answered == f.top),
            // Kept at (or sent up from) a free step with no priced step deciding: it counts in
            // the quantile as the surest (or least sure) item, so the threshold still sends the
            // target share of *all* items up (as OCL does).
            None if item.decided => {
                let up = f.answered == f.top;
                self.gate.record(if up { f32::MAX } else { f32::MIN }, up);
            }
            None => {}
        }
    }

    fn state_file(&self) -> Option<&'static str> {
        Some("gates.json")
    }

    fn save(&self) -> Result<Vec<u8>, CoreError> {
        let snapshot = ShareGates {
            score: self.score,
            gate: self.gate.clone(),
            temperature: self.temperature,
            rng_seed: self.rng_seed,
            rng_pos: self.rng.get_word_pos(),
            free: self.free.clone(),
            version: VERSION,
            rng: new_rng(),
        };
        serde_json::to_vec(&snapshot).map_err(|e| checkpoint_error(e.to_string()))
    }

    fn restore(&mut self, saved: Option<&[u8]>, _items_done: u64) -> Result<(), CoreError> {
        let bytes = saved.ok_or_else(|| checkpoint_error("missing".into()))?;
        let mut back: ShareGates =
            serde_json::from_slice(bytes).map_err(|e| checkpoint_error(e.to_string()))?;
        if back.version > VERSION {
            return Err(checkpoint_error(format!(
                "written by a newer tandem (gates checkpoint version {}, this build reads up \
                 to {VERSION})",
                back.version
            )));
        }
        if back.score != self.score {
            return Err(checkpoint_error(format!(
                "holds {:?} gates, the policy wants {:?}",
                back.score, self.score
            )));
        }
        back.rng = ChaCha8Rng::seed_from_u64(back.rng_seed);
        back.rng.set_word_pos(back.rng_pos);
        back.version = VERSION;
        *self = back;
        Ok(())
    }
}

fn checkpoint_error(reason: String) -> CoreError {
    CoreError::Tier {
        tier: "gates checkpoint".into(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ItemState;

    fn step<'a>(tier: usize, probs: &'a [f32], logits: &'a [f32]) -> Step<'a> {
        crate::policy::test_step(tier, 2, probs, logits, 1, probs[1])
    }

    /// The controller sees the lowest score along the path: an item the second tier is sure of
    /// counts as kept even when the first tier was unsure.
    #[test]
    fn the_share_is_held_over_the_lowest_score_on_the_path() {
        let mut g = ShareGates::new(GateScore::MaxProb, 0.5, 1.0, 3).unwrap();
        let (unsure, sure) = ([0.45f32, 0.55], [0.02f32, 0.98]);
        let mut up = 0;
        for _ in 0..2000 {
            let mut it = ItemState::default();
            g.begin_item(&mut it);
            let first = g.defer(&mut it, &step(0, &unsure, &[0.0, 0.2]));
            let second = first && g.defer(&mut it, &step(1, &sure, &[0.0, 3.9]));
            up += u32::from(second);
            let answered = if !first {
                0
            } else if !second {
                1
            } else {
                2
            };
            g.end_item(&it, &crate::policy::test_finished(answered, 2, None, &[]));
        }
        // Half the items must go up, and the sure tier's score is the path minimum of all of
        // them: the gate sends up about half, never none.
        assert!((up as f64 / 2000.0 - 0.5).abs() < 0.05, "{up}");
    }

    #[test]
    fn checkpoint_round_trip_resumes_the_draws_and_refuses_another_score() {
        let mut g = ShareGates::new(GateScore::Energy, 0.3, 1.0, 5).unwrap();
        let probs = [0.3f32, 0.7];
        for k in 0..50 {
            let mut it = ItemState::default();
            g.begin_item(&mut it);
            let logits = [0.0, 0.1 * k as f32];
            let d = g.defer(&mut it, &step(0, &probs, &logits));
            g.end_item(
                &it,
                &crate::policy::test_finished(if d { 2 } else { 0 }, 2, None, &[]),
            );
        }
        let saved = g.save().unwrap();
        let mut back = ShareGates::new(GateScore::Energy, 0.3, 1.0, 5).unwrap();
        back.restore(Some(&saved), 50).unwrap();
        let run = |g: &mut ShareGates| {
            (0..100)
                .map(|k| {
                    let mut it = ItemState::default();
                    g.begin_item(&mut it);
                    let logits = [0.0, 0.05 * k as f32];
                    g.defer(&mut it, &step(0, &probs, &logits))
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(&mut back), run(&mut g));
        let mut other = ShareGates::new(GateScore::MaxProb, 0.3, 1.0, 5).unwrap();
        let e = other.restore(Some(&saved), 50).unwrap_err().to_string();
        assert!(e.contains("holds Energy gates"), "{e}");
    }

    /// A checkpoint written before the free-step tables (version 1: no `free`, no `version`)
    /// loads with them empty; one from a newer layout is refused, naming the versions.
    #[test]
    fn a_version_1_checkpoint_loads_and_a_newer_one_is_refused() {
        let g = ShareGates::new(GateScore::MaxProb, 0.3, 1.0, 5).unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&g.save().unwrap()).unwrap();
        assert_eq!(v["version"], 2);
        let obj = v.as_object_mut().unwrap();
        obj.remove("free");
        obj.remove("version");
        let v1 = serde_json::to_vec(&v).unwrap();
        let mut back = ShareGates::new(GateScore::MaxProb, 0.3, 1.0, 5).unwrap();
        back.restore(Some(&v1), 0).unwrap();
        assert!(back.free.errors.is_empty() && back.version == VERSION);
        let mut v9 = v.clone();
        v9["version"] = 9.into();
        let e = back
            .restore(Some(&serde_json::to_vec(&v9).unwrap()), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 9") && e.contains("up to 2"), "{e}");
    }

    /// Below a free tier that is right more often (the top agrees with it 90% of the time, with
    /// the cheap tier 60%, whatever the cheap tier's confidence), the cheap tier keeps almost
    /// nothing, however low the share; the threshold is not consulted there.
    #[test]
    fn below_a_free_better_tier_the_cheap_tier_keeps_almost_nothing() {
        let mut g = ShareGates::new(GateScore::MaxProb, 0.1, 1.0, 7).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut kept = 0;
        for k in 0..3000 {
            let c0: f32 = 0.6 + 0.4 * rand::Rng::gen::<f32>(&mut rng);
            let c1: f32 = 0.6 + 0.4 * rand::Rng::gen::<f32>(&mut rng);
            let right0 = rand::Rng::gen::<f32>(&mut rng) < 0.6;
            let right1 = rand::Rng::gen::<f32>(&mut rng) < 0.9;
            let (p0, p1) = ([1.0 - c0, c0], [1.0 - c1, c1]);
            let mut s0 = crate::policy::test_step(0, 2, &p0, &[], 1, c0);
            s0.next_cost = 0.0;
            let s1 = crate::policy::test_step(1, 2, &p1, &[], 1, c1);
            let mut it = ItemState::default();
            g.begin_item(&mut it);
            let up0 = g.defer(&mut it, &s0);
            let up1 = up0 && g.defer(&mut it, &s1);
            let answered = usize::from(up0) + usize::from(up1);
            // The top tier is taken as right (label 1); a tier that is wrong says 0.
            let (mut t0, mut t1) = (s0, s1);
            t0.label = if right0 { 1 } else { 0 };
            t1.label = if right1 { 1 } else { 0 };
            let cheap = if up0 { vec![t0, t1] } else { vec![t0] };
            let top_label = up1.then_some(1);
            g.end_item(
                &it,
                &crate::policy::test_finished(answered, 2, top_label, &cheap),
            );
            if k >= 1000 {
                kept += u32::from(!up0);
            }
        }
        // Only the exploration's and warm-up's noise: well under a tenth of 2000.
        assert!(kept < 150, "kept {kept}");
    }
}
