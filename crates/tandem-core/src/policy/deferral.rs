//! Online cascade learning (OCL, Nie et al. 2024): each cheap tier i has a deferral model
//! d_i(x) ∈ [0, 1] over signals of its own prediction (top probability, margin, entropy, energy,
//! input length). The tier answers when d_i ≤ 0.5, else it defers to the next tier. The models learn
//! only from items the top tier labels, by imitating it under the cascade's cost-weighted objective
//! (1 − d_i)·loss(p_i, y_top) + d_i·μ·c_i: the best d_i is 1 exactly when the tier's loss exceeds
//! μ·c_i, so each labelled item teaches that target, weighted by what the wrong choice would cost,
//! plus a small calibration pull towards 1 when the tier disagrees with the top tier. Exploration
//! forwards some items the model would keep, with a probability that decays with its updates, so
//! disagreements keep being found. μ trades cost for accuracy; with a target share of top-tier calls
//! the engine adapts μ online to hold it.

use super::signals::Signals;
use crate::error::CoreError;
use crate::features::{FeatureVec, Featurizer};
use crate::learner::{LearnerConfig, OnlineSoftmax};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeferralConfig {
    /// Price of deferring, relative to a disagreement with the top tier.
    pub mu: f64,
    /// Hold this share of items reaching the top tier by adapting μ (None: μ fixed).
    pub target_top_share: Option<f64>,
    /// Initial exploration probability; it decays as 1/sqrt(1 + updates/50).
    pub explore: f64,
    pub learning_rate: f32,
    /// Weight of the calibration target (d → 1 on disagreement).
    pub calibration: f32,
    pub seed: u64,
}

impl Default for DeferralConfig {
    fn default() -> Self {
        DeferralConfig {
            mu: 0.3,
            target_top_share: None,
            explore: 0.1,
            learning_rate: 0.2,
            calibration: 0.1,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeferDecision {
    pub defer: bool,
    /// d_i(x), the model's deferral probability.
    pub d: f32,
    /// Forwarded by exploration although d ≤ 0.5.
    pub explored: bool,
}

pub struct OclDeferral {
    cfg: DeferralConfig,
    models: Vec<OnlineSoftmax>,
    featurizer: Featurizer,
    x: FeatureVec,
    log_mu: f64,
    rng: ChaCha8Rng,
}

impl OclDeferral {
    /// One deferral model per cheap tier (`cheap_tiers` = tiers below the top one).
    pub fn new(cheap_tiers: usize, cfg: DeferralConfig) -> Result<Self, CoreError> {
        if !(cfg.mu > 0.0 && cfg.mu.is_finite()) {
            return Err(CoreError::config("mu", cfg.mu, "must be positive"));
        }
        if let Some(t) = cfg.target_top_share {
            if !(0.0..=1.0).contains(&t) {
                return Err(CoreError::config(
                    "target_top_share",
                    t,
                    "must be between 0 and 1",
                ));
            }
        }
        if !(0.0..=1.0).contains(&cfg.explore) {
            return Err(CoreError::config(
                "explore",
                cfg.explore,
                "must be between 0 and 1",
            ));
        }
        let lc = LearnerConfig {
            bits: 10,
            classes: 2,
            learning_rate: cfg.learning_rate,
            l2: 0.0,
        };
        Ok(OclDeferral {
            cfg,
            models: (0..cheap_tiers)
                .map(|_| OnlineSoftmax::new(lc))
                .collect::<Result<_, _>>()?,
            featurizer: Featurizer::new(10)?,
            x: FeatureVec::default(),
            log_mu: cfg.mu.ln(),
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
        })
    }

    pub fn mu(&self) -> f64 {
        self.log_mu.exp()
    }

    fn featurize(&mut self, s: &Signals, input_chars: usize) {
        let f = &self.featurizer;
        self.x.clear();
        f.add_bias(&mut self.x);
        f.add_numeric("max_prob", s.max_prob, &mut self.x);
        f.add_numeric("margin", s.margin, &mut self.x);
        f.add_numeric("entropy", s.entropy, &mut self.x);
        f.add_numeric("energy", (s.energy / 5.0).clamp(-3.0, 3.0), &mut self.x);
        f.add_numeric(
            "log_chars",
            ((1 + input_chars) as f32).ln() / 6.0,
            &mut self.x,
        );
        // Confidence buckets let a linear model carve a non-linear threshold.
        let bucket = ((s.max_prob.clamp(0.0, 0.9999) * 10.0) as u32).to_string();
        f.add_token(0x6275_636b, &bucket, 1.0, &mut self.x);
    }

    /// d_i(x) for tier `tier`.
    pub fn defer_prob(&mut self, tier: usize, s: &Signals, input_chars: usize) -> f32 {
        self.featurize(s, input_chars);
        self.models.get(tier).map_or(1.0, |m| m.prob1(&self.x))
    }

    pub fn decide(&mut self, tier: usize, s: &Signals, input_chars: usize) -> DeferDecision {
        let d = self.defer_prob(tier, s, input_chars);
        if d > 0.5 {
            return DeferDecision {
                defer: true,
                d,
                explored: false,
            };
        }
        let updates = self.models.get(tier).map_or(0, |m| m.updates());
        let p = self.cfg.explore / (1.0 + updates as f64 / 50.0).sqrt();
        let explored = self.rng.gen::<f64>() < p;
        DeferDecision {
            defer: explored,
            d,
            explored,
        }
    }

    /// Learns from an item the top tier labelled: whether tier `tier` agreed with it, and the
    /// cost of deferring from this tier (the rest of the cascade, relative to the top tier's price).
    pub fn learn(
        &mut self,
        tier: usize,
        s: &Signals,
        input_chars: usize,
        agreed: bool,
        defer_cost: f64,
    ) {
        self.featurize(s, input_chars);
        let Some(m) = self.models.get_mut(tier) else {
            return;
        };
        let loss = if agreed { 0.0 } else { 1.0 };
        let price = self.log_mu.exp() * defer_cost.max(0.0);
        let target = usize::from(loss > price);
        let weight = (loss - price).abs() as f32;
        let mut p = [0.0f32; 2];
        m.predict(&self.x, &mut p);
        if weight > 0.0 {
            m.update(&self.x, target, weight.min(4.0), &p);
        }
        if self.cfg.calibration > 0.0 {
            m.update(&self.x, usize::from(!agreed), self.cfg.calibration, &p);
        }
    }

    /// Tells the share controller whether the last item reached the top tier; μ moves so that the
    /// share of items reaching it approaches the target (more top calls than wanted → deferring
    /// gets dearer).
    pub fn record(&mut self, reached_top: bool) {
        if let Some(target) = self.cfg.target_top_share {
            let err = f64::from(u8::from(reached_top)) - target;
            self.log_mu = (self.log_mu + 0.02 * err).clamp(-6.0, 3.0);
        }
    }
}

impl OclDeferral {
    /// Checkpoint: μ, then each tier's deferral model.
    pub fn save(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        w.write_all(&self.log_mu.to_le_bytes())?;
        // The exploration stream's position, so a resumed run explores exactly as an unbroken one.
        w.write_all(&self.rng.get_word_pos().to_le_bytes())?;
        w.write_all(&(self.models.len() as u32).to_le_bytes())?;
        for m in &self.models {
            m.save(w)?;
        }
        Ok(())
    }

    pub fn load(&mut self, r: &mut impl std::io::Read) -> Result<(), CoreError> {
        let bad = |m: String| CoreError::Tier {
            tier: "deferral checkpoint".into(),
            reason: m,
        };
        let mut b8 = [0u8; 8];
        let mut b4 = [0u8; 4];
        let mut b16 = [0u8; 16];
        r.read_exact(&mut b8).map_err(|e| bad(e.to_string()))?;
        r.read_exact(&mut b16).map_err(|e| bad(e.to_string()))?;
        r.read_exact(&mut b4).map_err(|e| bad(e.to_string()))?;
        let n = u32::from_le_bytes(b4) as usize;
        if n != self.models.len() {
            return Err(bad(format!(
                "holds {n} tiers, the cascade has {}",
                self.models.len()
            )));
        }
        let mut models = Vec::with_capacity(n);
        for _ in 0..n {
            models.push(OnlineSoftmax::load(r)?);
        }
        self.models = models;
        self.log_mu = f64::from_le_bytes(b8);
        self.rng.set_word_pos(u128::from_le_bytes(b16));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(max_prob: f32) -> Signals {
        Signals::of(
            &[max_prob, 1.0 - max_prob],
            &[max_prob.ln(), (1.0 - max_prob).ln()],
            1.0,
        )
    }

    #[test]
    fn a_disagreement_moves_d_up_and_an_agreement_down() {
        let mut o = OclDeferral::new(
            1,
            DeferralConfig {
                explore: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        let s = sig(0.7);
        let d0 = o.defer_prob(0, &s, 100);
        o.learn(0, &s, 100, false, 1.0);
        let d1 = o.defer_prob(0, &s, 100);
        assert!(d1 > d0, "disagreement: {d0} -> {d1}");
        o.learn(0, &s, 100, true, 1.0);
        o.learn(0, &s, 100, true, 1.0);
        assert!(o.defer_prob(0, &s, 100) < d1, "agreement moves d down");
    }

    #[test]
    fn learns_to_defer_exactly_where_the_tier_is_unsure() {
        // The tier is right when confident (≥ 0.8), wrong otherwise.
        let mut o = OclDeferral::new(
            1,
            DeferralConfig {
                explore: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..3000 {
            let p: f32 = rng.gen_range(0.5..1.0);
            o.learn(0, &sig(p), 80, p >= 0.8, 1.0);
        }
        assert!(!o.decide(0, &sig(0.95), 80).defer);
        assert!(o.decide(0, &sig(0.6), 80).defer);
    }

    #[test]
    fn mu_trades_cost_for_accuracy() {
        // With deferring very dear (μ large), even unsure predictions are kept.
        let mut o = OclDeferral::new(
            1,
            DeferralConfig {
                mu: 50.0,
                explore: 0.0,
                calibration: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        for _ in 0..500 {
            o.learn(0, &sig(0.6), 80, false, 1.0);
        }
        assert!(!o.decide(0, &sig(0.6), 80).defer);
    }

    #[test]
    fn target_share_adapts_mu() {
        let mut o = OclDeferral::new(
            1,
            DeferralConfig {
                target_top_share: Some(0.2),
                ..Default::default()
            },
        )
        .unwrap();
        let mu0 = o.mu();
        for _ in 0..100 {
            o.record(true);
        }
        assert!(o.mu() > mu0, "too many top calls make deferring dearer");
        assert!(OclDeferral::new(
            1,
            DeferralConfig {
                mu: 0.0,
                ..Default::default()
            }
        )
        .is_err());
    }

    #[test]
    fn checkpoint_round_trip() {
        let mut o = OclDeferral::new(
            2,
            DeferralConfig {
                target_top_share: Some(0.3),
                ..Default::default()
            },
        )
        .unwrap();
        o.learn(1, &sig(0.7), 10, false, 1.0);
        o.record(true);
        let mut buf = Vec::new();
        o.save(&mut buf).unwrap();
        let mut back = OclDeferral::new(2, DeferralConfig::default()).unwrap();
        back.load(&mut buf.as_slice()).unwrap();
        let explore = |o: &mut OclDeferral| {
            (0..50)
                .map(|_| o.decide(0, &sig(0.99), 10).explored)
                .collect::<Vec<_>>()
        };
        let mut o2 = OclDeferral::new(2, DeferralConfig::default()).unwrap();
        o2.load(&mut buf.as_slice()).unwrap();
        assert_eq!(
            explore(&mut o2),
            explore(&mut o),
            "the exploration stream resumes where it was"
        );
        assert_eq!(back.mu(), o.mu());
        assert_eq!(
            back.defer_prob(1, &sig(0.7), 10),
            o.defer_prob(1, &sig(0.7), 10)
        );
        assert!(OclDeferral::new(3, DeferralConfig::default())
            .unwrap()
            .load(&mut buf.as_slice())
            .is_err());
    }

    #[test]
    fn exploration_forwards_and_decays() {
        let mut o = OclDeferral::new(
            1,
            DeferralConfig {
                explore: 0.5,
                ..Default::default()
            },
        )
        .unwrap();
        for _ in 0..200 {
            o.learn(0, &sig(0.99), 80, true, 1.0);
        }
        let explored = (0..2000)
            .filter(|_| o.decide(0, &sig(0.99), 80).explored)
            .count();
        // 0.5 / sqrt(1 + 200/50) ≈ 0.22
        assert!((300..600).contains(&explored), "{explored}");
    }
}
