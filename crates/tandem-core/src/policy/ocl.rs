//! Online cascade learning (OCL: Nie, Ding, Hu, Jermaine, Chaudhuri, "Online Cascade Learning for
//! Efficient Inference over Streams", ICML 2024, arXiv 2402.04513; the cascade objective of its
//! problem formulation and its online, imitation-learning algorithm). [`Ocl`] is the cascade
//! engine's policy; [`OclDeferral`] its learner. Each cheap tier i has a deferral decision
//! d_i(x) ∈ {0, 1} chosen to minimise the cascade's cost-weighted imitation objective
//! Σ_i Π_{k<i} d_k · [(1 − d_i)·loss(p_i, y_top) + d_i·μ·c_i], with c_i the next tier's price
//! relative to the top one's. Tier i's part of it is minimised by deferring exactly when its
//! expected loss — the probability that it disagrees with the top tier — exceeds μ·c_i plus what
//! the item is expected to cost from the next tier on (its cost-to-go: 0 above the top tier). So
//! each tier learns a calibrated estimate of that probability online, from the items the top tier
//! labels (logistic over the tier's signals: top probability, margin, entropy, energy, input
//! length, whether it agrees with the tier below it, and optionally the input's words), and keeps
//! a moving average of the cost-to-go its own decisions realise, for the tier below. A cheap tier
//! under a free one (a hashed model under an encoder) thus keeps only the items it would get right
//! about as often as the cascade above it would; charging it a full top-tier call for deferring
//! lets it answer far more than it should. Learning the probability rather than the thresholded
//! target keeps what was learned valid when μ moves. Exploration forwards some items the tier
//! would keep, with a probability that decays with its updates, so disagreements keep being found
//! where it is sure.
//!
//! The words and the tier-below signals can also mislead: a correction fitted on the items the top
//! tier labels (the unsure ones) may rank the rest worse than the tier's own confidence does. So,
//! with `validate`, each tier also keeps a calibrated prior alone (a logistic over its error
//! estimate: it ranks items exactly as the confidence shunt does), and the estimate is the
//! Bayesian mixture of the two, weighted by each one's log-loss on the labelled items scored before
//! learning from them (progressive validation). The mixture's cumulative log-loss is within ln 2 of
//! the better of the two, so the learned correction is used only as far as it predicts better
//! than the shunt's own signal.
//!
//! μ trades cost for accuracy. With a target share of top-tier calls, μ is held online: an item
//! reaches the top tier when every cheap tier defers, i.e. when the lowest
//! (estimate − next cost-to-go)/c_i along its path exceeds μ, so μ is set to the quantile of that
//! path minimum (over recent items) that sends the target share up, corrected for drift (see
//! `ShareController`).

use super::signals::Signals;
use super::{Deferral, Finished, ItemState, Step};
use crate::calibrate::ShareController;
use crate::error::CoreError;
use crate::features::{ns, FeatureVec, Featurizer, TextFeatures};
use crate::learner::{LearnerConfig, OnlineSoftmax};
use crate::query::Query;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeferralConfig {
    /// Price of deferring, relative to a disagreement with the top tier (with no target share).
    pub mu: f64,
    /// Hold this share of items reaching the top tier by setting μ online (None: μ fixed).
    pub target_top_share: Option<f64>,
    /// Initial exploration probability; it decays as 1/sqrt(1 + updates/50).
    pub explore: f64,
    pub learning_rate: f32,
    /// Also learn from the input's words (hashed unigrams and bigrams): which kinds of inputs a
    /// tier gets wrong, beyond how unsure it says it is.
    pub text_features: bool,
    /// Mix the learned correction with the calibrated prior alone by their validated log-loss.
    pub validate: bool,
    pub seed: u64,
}

impl Default for DeferralConfig {
    fn default() -> Self {
        DeferralConfig {
            mu: 0.3,
            target_top_share: None,
            explore: 0.1,
            learning_rate: 0.1,
            text_features: false,
            validate: true,
            seed: 0,
        }
    }
}

/// What a cheap tier's deferral model sees of one item.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub signals: Signals,
    pub text: &'a str,
    /// The tier below: whether it gave the same label, and its top probability.
    pub below: Option<(bool, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeferDecision {
    pub defer: bool,
    /// The estimated probability that the tier disagrees with the top tier.
    pub p_disagree: f32,
    /// Forwarded by exploration although the estimate says keep it.
    pub explored: bool,
}

pub struct OclDeferral {
    cfg: DeferralConfig,
    models: Vec<OnlineSoftmax>,
    /// Per tier: the calibrated prior alone, and the validated log-loss of [correction, prior].
    priors: Vec<OnlineSoftmax>,
    losses: Vec<[f64; 2]>,
    /// Per tier (the top one last, at 0): the expected cost-to-go of an item that reaches it, a
    /// moving average of what its decisions realised (its estimate when it answers, μ·c plus the
    /// next tier's cost-to-go when it defers).
    to_go: Vec<f64>,
    featurizer: Featurizer,
    x: FeatureVec,
    x_prior: FeatureVec,
    mu: f64,
    share: Option<ShareController>,
    rng: ChaCha8Rng,
    /// Per tier (indexed as `to_go`): its realised cost-to-go by the tier below's confidence,
    /// decayed [weight, Σ cost] per bucket. The stream average alone says what the tier costs on
    /// the average item; a tier below a free one needs it on items like the one in hand.
    to_go_by_below: Vec<[[f64; 2]; BUCKETS]>,
}

/// Confidence buckets of the per-item cost-to-go.
const BUCKETS: usize = 8;

/// A confidence's bucket: by its error 1 − confidence, finer where the error is small (where a
/// cheap tier keeps items).
fn bucket(confidence: f32) -> usize {
    let e = 1.0 - confidence;
    [0.01f32, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4]
        .iter()
        .position(|&edge| e < edge)
        .unwrap_or(BUCKETS - 1)
}

impl OclDeferral {
    /// One deferral model per cheap tier (`cheap_tiers` = tiers below the top one).
    pub fn new(cheap_tiers: usize, cfg: DeferralConfig) -> Result<Self, CoreError> {
        if !(cfg.mu > 0.0 && cfg.mu.is_finite()) {
            return Err(CoreError::config("mu", cfg.mu, "must be positive"));
        }
        if !(0.0..=1.0).contains(&cfg.explore) {
            return Err(CoreError::config(
                "explore",
                cfg.explore,
                "must be between 0 and 1",
            ));
        }
        let share = match cfg.target_top_share {
            Some(t) => Some(ShareController::new(t, 1000)?),
            None => None,
        };
        let bits = if cfg.text_features { 18 } else { 10 };
        let lc = LearnerConfig {
            bits,
            classes: 2,
            learning_rate: cfg.learning_rate,
            l2: 0.0,
        };
        let prior_cfg = LearnerConfig { bits: 10, ..lc };
        Ok(OclDeferral {
            cfg,
            models: (0..cheap_tiers)
                .map(|_| OnlineSoftmax::new(lc))
                .collect::<Result<_, _>>()?,
            priors: (0..cheap_tiers)
                .map(|_| OnlineSoftmax::new(prior_cfg))
                .collect::<Result<_, _>>()?,
            losses: vec![[0.0; 2]; cheap_tiers],
            to_go: vec![0.0; cheap_tiers + 1],
            featurizer: Featurizer::new(bits)?,
            x: FeatureVec::default(),
            x_prior: FeatureVec::default(),
            mu: cfg.mu,
            share,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            to_go_by_below: vec![[[0.0; 2]; BUCKETS]; cheap_tiers + 1],
        })
    }

    /// The current μ (with a target share: the threshold the share controller last applied).
    pub fn mu(&self) -> f64 {
        self.mu
    }

    fn featurize(&mut self, c: &Context) {
        let s = &c.signals;
        let f = &self.featurizer;
        // The prior's own features: a bias and its log-odds (Platt scaling), so it stays monotone
        // in the tier's confidence.
        self.x_prior.clear();
        self.x_prior.push(0, 1.0);
        self.x_prior.push(1, prior_logit(s) / 4.0);
        self.x.clear();
        f.add_bias(&mut self.x);
        f.add_numeric("max_prob", s.max_prob, &mut self.x);
        f.add_numeric("margin", s.margin, &mut self.x);
        f.add_numeric("entropy", s.entropy, &mut self.x);
        f.add_numeric("energy", (s.energy / 5.0).clamp(-3.0, 3.0), &mut self.x);
        let chars = c.text.chars().count();
        f.add_numeric("log_chars", ((1 + chars) as f32).ln() / 6.0, &mut self.x);
        // Confidence buckets let a linear model carve a non-linear threshold.
        let bucket = ((s.max_prob.clamp(0.0, 0.9999) * 10.0) as u32).to_string();
        f.add_token(0x6275_636b, &bucket, 1.0, &mut self.x);
        if let Some((agrees, below_conf)) = c.below {
            // Two tiers that disagree flag a hard item whatever either one's confidence says.
            let sign = if agrees { 1.0 } else { -1.0 };
            f.add_numeric("agrees_below", sign, &mut self.x);
            f.add_numeric("agree_x_conf", sign * below_conf, &mut self.x);
            f.add_numeric("below_conf", below_conf, &mut self.x);
        }
        if self.cfg.text_features {
            let words = TextFeatures {
                word_ngrams: 2,
                char_min: 0,
                char_max: 0,
            };
            self.featurizer
                .add_text(ns::PROMPT, c.text, words, 0.5, &mut self.x);
        }
    }

    /// The estimated probability that tier `tier` disagrees with the top tier on this item.
    pub fn p_disagree(&mut self, tier: usize, c: &Context) -> f32 {
        self.featurize(c);
        let (Some(m), Some(prior)) = (self.models.get(tier), self.priors.get(tier)) else {
            return 1.0;
        };
        let corrected = with_prior(m, &self.x, &c.signals)[1];
        if !self.cfg.validate {
            return corrected;
        }
        let alone = with_prior(prior, &self.x_prior, &c.signals)[1];
        let w = self.correction_weight(tier);
        (w * f64::from(corrected) + (1.0 - w) * f64::from(alone)) as f32
    }

    /// The mixture's weight on the learned correction: its posterior given both validated losses.
    pub fn correction_weight(&self, tier: usize) -> f64 {
        if !self.cfg.validate {
            return 1.0;
        }
        self.losses.get(tier).map_or(1.0, |[full, prior]| {
            1.0 / (1.0 + (full - prior).clamp(-50.0, 50.0).exp())
        })
    }

    /// Defer from tier `tier`? `next_cost` is c_i, the price of the next tier relative to the top
    /// one. Deferring pays μ·c_i plus the next tier's expected cost-to-go (0 for the top tier), so
    /// a tier defers when its estimated loss exceeds that (OCL's cost-weighted objective).
    ///
    /// A free next tier (c_i = 0; issue 14, item 5): deferring spends no
    /// share, so the rule is p > cost-to-go with no μ, decided here rather than by the share
    /// controller (whose quantile of (p − cost-to-go)/c would divide by zero, and whose drift
    /// correction, while it pays back the warm-up's top calls, would have the cheap tier keep
    /// everything). The cost-to-go compared is the tier above's on items the cheap tier is as sure
    /// of (its confidence bucket), never more than its stream average: it is measured only on the
    /// items that went up, the cheap tier's harder ones, so it overstates what the tier above
    /// would lose on the ones it keeps. A cheap tier below a free one thus keeps only what it
    /// would get right about as often as the tiers above it, counting their price.
    ///
    /// `item` holds the item's tie-break draw and the lowest score along its path.
    pub fn decide(
        &mut self,
        item: &mut ItemState,
        tier: usize,
        c: &Context,
        next_cost: f64,
    ) -> DeferDecision {
        let p = self.p_disagree(tier, c);
        let average = self.to_go.get(tier + 1).copied().unwrap_or(0.0);
        let free = next_cost <= 0.0;
        let (next, defer) = if free {
            let next = self
                .next_to_go(tier, c.signals.max_prob)
                .map_or(average, |b| b.min(average));
            (next, f64::from(p) > next)
        } else {
            let score = ((f64::from(p) - average) / next_cost) as f32;
            // Only priced steps spend the share: the controller sees the lowest of their scores.
            item.record(score);
            let defer = match (&self.share, self.cfg.target_top_share) {
                (Some(share), Some(target)) => {
                    let draw = item.draw(&mut self.rng);
                    let d = share.decide(score, target, draw);
                    if d.threshold.is_finite() {
                        self.mu = f64::from(d.threshold);
                    }
                    d.escalate
                }
                _ => f64::from(score) > self.mu,
            };
            (average, defer)
        };
        let realised = if defer {
            self.mu * next_cost + next
        } else {
            f64::from(p)
        };
        if let Some(v) = self.to_go.get_mut(tier) {
            *v += TO_GO_RATE * (realised - *v);
        }
        if let (Some((_, below)), Some(t)) = (c.below, self.to_go_by_below.get_mut(tier)) {
            let [n, sum] = &mut t[bucket(below)];
            *n = (1.0 - BUCKET_RATE) * *n + 1.0;
            *sum = (1.0 - BUCKET_RATE) * *sum + realised;
        }
        if defer {
            return DeferDecision {
                defer: true,
                p_disagree: p,
                explored: false,
            };
        }
        let updates = self.models.get(tier).map_or(0, |m| m.updates());
        let rate = self.cfg.explore / (1.0 + updates as f64 / 50.0).sqrt();
        let explored = self.rng.gen::<f64>() < rate;
        DeferDecision {
            defer: explored,
            p_disagree: p,
            explored,
        }
    }

    /// Tier `tier + 1`'s realised cost-to-go on items tier `tier` was `confidence` sure of (None
    /// until its bucket has seen enough of them).
    fn next_to_go(&self, tier: usize, confidence: f32) -> Option<f64> {
        let [n, sum] = self.to_go_by_below.get(tier + 1)?[bucket(confidence)];
        (n >= BUCKET_MIN).then(|| sum / n)
    }

    /// Learns from an item the top tier labelled: whether tier `tier` agreed with it.
    pub fn learn(&mut self, tier: usize, c: &Context, agreed: bool) {
        self.featurize(c);
        let (Some(m), Some(prior), Some(loss)) = (
            self.models.get_mut(tier),
            self.priors.get_mut(tier),
            self.losses.get_mut(tier),
        ) else {
            return;
        };
        let target = usize::from(!agreed);
        let p = with_prior(m, &self.x, &c.signals);
        let q = with_prior(prior, &self.x_prior, &c.signals);
        // Scored before learning from the item: an honest estimate of each one's loss.
        loss[0] -= f64::from(p[target].max(1e-6)).ln();
        loss[1] -= f64::from(q[target].max(1e-6)).ln();
        m.update(&self.x, target, 1.0, &p);
        prior.update(&self.x_prior, target, 1.0, &q);
    }

    /// Ends an item that some cheap tier decided on: whether it reached the top tier. The share
    /// controller learns the path's lowest estimate/cost.
    pub fn end_item(&mut self, item: &ItemState, reached_top: bool) {
        // No priced step decided (a cheap tier below a free one kept the item, or deferred into a
        // tier still warming up): the item stayed, or went up, whatever the threshold was.
        let m = item
            .lowest
            .unwrap_or(if reached_top { f32::MAX } else { f32::MIN });
        if let Some(share) = self.share.as_mut() {
            share.record(m, reached_top);
        }
    }
}

/// OCL as the cascade engine's [`Deferral`] policy: each warm cheap tier asks its deferral model;
/// every cheap tier that ran learns, from each item the top tier answers, whether it agreed; the
/// share (when held) is steered only on items some cheap tier decided on.
pub struct Ocl {
    deferral: OclDeferral,
    /// Temperature of the energy signal.
    temperature: f32,
}

impl Ocl {
    pub fn new(
        cheap_tiers: usize,
        cfg: DeferralConfig,
        temperature: f32,
    ) -> Result<Self, CoreError> {
        Ok(Ocl {
            deferral: OclDeferral::new(cheap_tiers, cfg)?,
            temperature,
        })
    }

    pub fn deferral(&self) -> &OclDeferral {
        &self.deferral
    }

    fn context<'a>(&self, step: &Step<'a>) -> Context<'a> {
        Context {
            signals: Signals::of_step(step, self.temperature),
            text: step.input(),
            below: step.agrees_below(),
        }
    }
}

impl Deferral for Ocl {
    fn name(&self) -> &'static str {
        "ocl"
    }

    fn defer(&mut self, item: &mut ItemState, step: &Step) -> bool {
        item.decided = true;
        let ctx = self.context(step);
        let d = self.deferral.decide(item, step.tier, &ctx, step.next_cost);
        item.explored |= d.explored;
        d.defer
    }

    fn end_item(&mut self, item: &ItemState, f: &Finished) {
        for step in f.cheap {
            if let Some(agreed) = f.agreed(step) {
                let ctx = self.context(step);
                self.deferral.learn(step.tier, &ctx, agreed);
            }
        }
        // The share is steered only where a cheap tier could have answered: during warm-up
        // everything goes to the top tier whatever μ is.
        if item.decided {
            self.deferral.end_item(item, f.answered == f.top);
        }
    }

    /// Feedback on a cheap tier's answer (its quality ≥ 0.5: right) teaches that tier's
    /// deferral model as the top tier's agreement does; the top tier's own outcome teaches
    /// nothing here (its answer is the reference the cheap tiers imitate).
    fn learn_outcomes(&mut self, _item: &ItemState, f: &Finished, observed: &[Option<f32>]) {
        for step in f.cheap {
            if let Some(Some(q)) = observed.get(step.tier) {
                let ctx = self.context(step);
                self.deferral.learn(step.tier, &ctx, *q >= 0.5);
            }
        }
    }

    fn state_file(&self) -> Option<&'static str> {
        Some("deferral.bin")
    }

    fn save(&self) -> Result<Vec<u8>, CoreError> {
        let mut buf = Vec::new();
        self.deferral.save(&mut buf).map_err(|e| CoreError::Tier {
            tier: "deferral checkpoint".into(),
            reason: e.to_string(),
        })?;
        Ok(buf)
    }

    fn restore(&mut self, saved: Option<&[u8]>, _items_done: u64) -> Result<(), CoreError> {
        match saved {
            Some(mut bytes) => self.deferral.load(&mut bytes),
            None => Err(CoreError::Tier {
                tier: "deferral checkpoint".into(),
                reason: "missing".into(),
            }),
        }
    }
}

/// OCL's learned deferral for tiers that expose nothing but their answer's outcome — recorded
/// (replayed) tiers: the same learner, decision rule and cost-to-go as [`Ocl`], but each cheap
/// tier learns the probability that its own answer is wrong from the outcomes revealed after the
/// item ([`Deferral::learn_outcomes`]: the gold standing in for the top tier), not from
/// agreement with the top tier's label, which replayed tiers cannot give. It sees the input's
/// words and length (no confidence, no tier below). Every revealed cheap tier learns, whether
/// or not it ran on the item.
pub struct OclOutcomes {
    deferral: OclDeferral,
    top: usize,
}

impl OclOutcomes {
    /// `cheap_tiers`: the tiers below the top.
    pub fn new(cheap_tiers: usize, cfg: DeferralConfig) -> Result<Self, CoreError> {
        Ok(OclOutcomes {
            deferral: OclDeferral::new(cheap_tiers, cfg)?,
            top: cheap_tiers,
        })
    }

    fn context(query: &Query) -> Context<'_> {
        Context {
            signals: Signals::of(&[], &[], 1.0),
            text: query.routing_text(),
            below: None,
        }
    }
}

impl Deferral for OclOutcomes {
    fn name(&self) -> &'static str {
        "ocl"
    }

    fn defer(&mut self, item: &mut ItemState, step: &Step) -> bool {
        item.decided = true;
        let d = self
            .deferral
            .decide(item, step.tier, &Self::context(step.query), step.next_cost);
        item.explored |= d.explored;
        d.defer
    }

    fn end_item(&mut self, item: &ItemState, f: &Finished) {
        if item.decided {
            self.deferral.end_item(item, f.answered == f.top);
        }
    }

    fn learn_outcomes(&mut self, _item: &ItemState, f: &Finished, observed: &[Option<f32>]) {
        let ctx = Self::context(f.query);
        for (tier, o) in observed.iter().enumerate().take(self.top) {
            if let Some(q) = o {
                self.deferral.learn(tier, &ctx, *q >= 0.5);
            }
        }
    }
}

/// The model learns a correction to a prior: the tier's own error estimate 1 − max probability.
/// Untrained, the deferral is the confidence shunt; it departs from it only as far as the top
/// tier's labels show the tier's confidence to be off (a weak tier's overconfidence, a kind of
/// input it gets wrong), so the early stream is not spent on a blank model.
fn with_prior(m: &OnlineSoftmax, x: &FeatureVec, s: &Signals) -> [f32; 2] {
    let mut l = [0.0f32; 2];
    m.logits(x, &mut l);
    let z = l[1] - l[0] + prior_logit(s);
    let p1 = 1.0 / (1.0 + (-z).exp());
    [1.0 - p1, p1]
}

/// The log-odds of the tier's own error estimate, 1 − max probability.
fn prior_logit(s: &Signals) -> f32 {
    let e = (1.0 - s.max_prob).clamp(1e-3, 1.0 - 1e-3);
    (e / (1.0 - e)).ln()
}

/// The moving average's rate for the expected cost-to-go (about the last 100 items).
const TO_GO_RATE: f64 = 0.01;
/// Per bucket: the decay of the realised cost-to-go (about its last 50 items), and the weight it
/// needs before it is used.
const BUCKET_RATE: f64 = 0.02;
const BUCKET_MIN: f64 = 10.0;

/// Starts a checkpoint, so one from an earlier layout is refused with a clear error. OCL4 adds
/// the per-bucket cost-to-go; an OCL3 checkpoint loads with it empty (it refills in ~50 items).
const CHECKPOINT_MAGIC: &[u8; 4] = b"OCL4";
const CHECKPOINT_MAGIC_V3: &[u8; 4] = b"OCL3";

impl OclDeferral {
    /// Checkpoint: μ, the exploration stream's position, each tier's model, the share controller.
    pub fn save(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        w.write_all(CHECKPOINT_MAGIC)?;
        w.write_all(&self.mu.to_le_bytes())?;
        // The exploration stream's position, so a resumed run explores exactly as an unbroken one.
        w.write_all(&self.rng.get_word_pos().to_le_bytes())?;
        w.write_all(&(self.models.len() as u32).to_le_bytes())?;
        for ((m, prior), [full, alone]) in self.models.iter().zip(&self.priors).zip(&self.losses) {
            m.save(w)?;
            prior.save(w)?;
            w.write_all(&full.to_le_bytes())?;
            w.write_all(&alone.to_le_bytes())?;
        }
        for v in &self.to_go {
            w.write_all(&v.to_le_bytes())?;
        }
        let share = serde_json::to_vec(&self.share).map_err(std::io::Error::other)?;
        w.write_all(&(share.len() as u64).to_le_bytes())?;
        w.write_all(&share)?;
        for bucket in self.to_go_by_below.iter().flatten().flatten() {
            w.write_all(&bucket.to_le_bytes())?;
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
        r.read_exact(&mut b4).map_err(|e| bad(e.to_string()))?;
        let v3 = &b4 == CHECKPOINT_MAGIC_V3;
        if &b4 != CHECKPOINT_MAGIC && !v3 {
            return Err(bad(
                "not a deferral checkpoint of version OCL3 or OCL4 (written by an older tandem?); \
                 remove the state directory to start fresh"
                    .into(),
            ));
        }
        r.read_exact(&mut b8).map_err(|e| bad(e.to_string()))?;
        let mu = f64::from_le_bytes(b8);
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
        let mut priors = Vec::with_capacity(n);
        let mut losses = Vec::with_capacity(n);
        for _ in 0..n {
            models.push(OnlineSoftmax::load(r)?);
            priors.push(OnlineSoftmax::load(r)?);
            let mut pair = [0.0f64; 2];
            for l in &mut pair {
                r.read_exact(&mut b8).map_err(|e| bad(e.to_string()))?;
                *l = f64::from_le_bytes(b8);
                if !l.is_finite() || *l < 0.0 {
                    return Err(bad(format!("validated loss {l}")));
                }
            }
            losses.push(pair);
        }
        let mut to_go = vec![0.0f64; n + 1];
        for v in &mut to_go {
            r.read_exact(&mut b8).map_err(|e| bad(e.to_string()))?;
            *v = f64::from_le_bytes(b8);
            if !v.is_finite() {
                return Err(bad(format!("cost-to-go {v}")));
            }
        }
        r.read_exact(&mut b8).map_err(|e| bad(e.to_string()))?;
        let len = u64::from_le_bytes(b8) as usize;
        if len > 1 << 24 {
            return Err(bad(format!("share controller of {len} bytes")));
        }
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf).map_err(|e| bad(e.to_string()))?;
        let share: Option<ShareController> =
            serde_json::from_slice(&buf).map_err(|e| bad(e.to_string()))?;
        if share.is_some() != self.share.is_some() {
            return Err(bad("written with another target-share setting".into()));
        }
        let mut by_below = vec![[[0.0f64; 2]; BUCKETS]; n + 1];
        if !v3 {
            for v in by_below.iter_mut().flatten().flatten() {
                r.read_exact(&mut b8).map_err(|e| bad(e.to_string()))?;
                *v = f64::from_le_bytes(b8);
                if !v.is_finite() {
                    return Err(bad(format!("bucketed cost-to-go {v}")));
                }
            }
        }
        self.to_go_by_below = by_below;
        self.models = models;
        self.priors = priors;
        self.losses = losses;
        self.to_go = to_go;
        self.mu = mu;
        self.share = share;
        self.rng.set_word_pos(u128::from_le_bytes(b16));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ItemState;

    fn sig(max_prob: f32) -> Signals {
        Signals::of(
            &[max_prob, 1.0 - max_prob],
            &[max_prob.ln(), (1.0 - max_prob).ln()],
            1.0,
        )
    }

    fn ctx(max_prob: f32, text: &str) -> Context<'_> {
        Context {
            signals: sig(max_prob),
            text,
            below: None,
        }
    }

    fn quiet() -> DeferralConfig {
        DeferralConfig {
            explore: 0.0,
            ..Default::default()
        }
    }

    /// Replayed tiers: only revealed outcomes teach (each revealed cheap tier, whether it ran
    /// or not); the top tier's label, which replayed tiers cannot make comparable, teaches
    /// nothing.
    #[test]
    fn ocl_from_outcomes_learns_revealed_outcomes_only() {
        let cfg = DeferralConfig {
            text_features: true,
            ..quiet()
        };
        let mut p = OclOutcomes::new(1, cfg).unwrap();
        let hard = Query::text("h", "prove the lemma");
        let easy = Query::text("e", "add two numbers");
        let d = |p: &mut OclOutcomes, q: &Query| p.deferral.p_disagree(0, &OclOutcomes::context(q));
        let (h0, e0) = (d(&mut p, &hard), d(&mut p, &easy));
        let finished = |q| Finished {
            query: q,
            answered: 1,
            top: 1,
            top_label: Some(0),
            top_text: None,
            cheap: &[],
        };
        p.end_item(&ItemState::default(), &finished(&hard));
        assert_eq!(d(&mut p, &hard), h0, "the top's label taught nothing");
        for _ in 0..30 {
            let item = ItemState::default();
            p.learn_outcomes(&item, &finished(&hard), &[Some(0.0), Some(1.0)]);
            p.learn_outcomes(&item, &finished(&easy), &[Some(1.0), Some(1.0)]);
        }
        // Untrained, both start at the prior (no confidence: everything looks wrong); the
        // outcomes tell them apart.
        assert!((h0 - e0).abs() < 1e-6);
        let (h1, e1) = (d(&mut p, &hard), d(&mut p, &easy));
        assert!(h1 > e1 + 0.3, "hard {h1}, easy {e1}");
    }

    #[test]
    fn a_disagreement_moves_d_up_and_an_agreement_down() {
        let mut o = OclDeferral::new(1, quiet()).unwrap();
        let c = ctx(0.7, "a fine film");
        let d0 = o.p_disagree(0, &c);
        o.learn(0, &c, false);
        let d1 = o.p_disagree(0, &c);
        assert!(d1 > d0, "disagreement moves d up: {d0} -> {d1}");
        o.learn(0, &c, true);
        o.learn(0, &c, true);
        assert!(o.p_disagree(0, &c) < d1, "agreement moves d down");
    }

    #[test]
    fn learns_to_defer_exactly_where_the_tier_is_unsure() {
        let mut o = OclDeferral::new(1, quiet()).unwrap();
        // The tier is right when its top probability is at least 0.8, wrong below.
        for k in 0..3000 {
            let p = 0.5 + 0.5 * ((k * 37) % 100) as f32 / 100.0;
            o.learn(0, &ctx(p, "x"), p >= 0.8);
        }
        assert!(
            !o.decide(&mut ItemState::default(), 0, &ctx(0.95, "x"), 1.0)
                .defer
        );
        assert!(
            o.decide(&mut ItemState::default(), 0, &ctx(0.6, "x"), 1.0)
                .defer
        );
    }

    #[test]
    fn mu_trades_cost_for_accuracy() {
        let mut o = OclDeferral::new(1, quiet()).unwrap();
        for k in 0..2000 {
            // Wrong two times in five at this confidence.
            o.learn(0, &ctx(0.6, "x"), k % 5 >= 2);
        }
        let p = o.p_disagree(0, &ctx(0.6, "x"));
        assert!((p - 0.4).abs() < 0.08, "calibrated: {p}");
        // Deferring at cost 1 is worth it when μ < 0.4, not when μ > 0.4.
        let mut cheap = OclDeferral::new(1, DeferralConfig { mu: 0.2, ..quiet() }).unwrap();
        let mut dear = OclDeferral::new(1, DeferralConfig { mu: 0.8, ..quiet() }).unwrap();
        for k in 0..2000 {
            cheap.learn(0, &ctx(0.6, "x"), k % 5 >= 2);
            dear.learn(0, &ctx(0.6, "x"), k % 5 >= 2);
        }
        assert!(
            cheap
                .decide(&mut ItemState::default(), 0, &ctx(0.6, "x"), 1.0)
                .defer
        );
        assert!(
            !dear
                .decide(&mut ItemState::default(), 0, &ctx(0.6, "x"), 1.0)
                .defer
        );
        // A dearer next tier (c = 3) makes keeping the answer the better choice.
        assert!(
            !cheap
                .decide(&mut ItemState::default(), 0, &ctx(0.6, "x"), 3.0)
                .defer
        );
    }

    #[test]
    fn disagreement_with_the_tier_below_is_learned() {
        let mut o = OclDeferral::new(2, quiet()).unwrap();
        for k in 0..3000 {
            let agrees = k % 2 == 0;
            let c = Context {
                signals: sig(0.8),
                text: "x",
                below: Some((agrees, 0.8)),
            };
            o.learn(1, &c, agrees);
        }
        let mut at = |agrees| {
            o.p_disagree(
                1,
                &Context {
                    signals: sig(0.8),
                    text: "x",
                    below: Some((agrees, 0.8)),
                },
            )
        };
        assert!(at(false) > 0.8 && at(true) < 0.2);
    }

    #[test]
    fn word_features_find_the_inputs_a_tier_gets_wrong() {
        let cfg = DeferralConfig {
            text_features: true,
            ..quiet()
        };
        let mut o = OclDeferral::new(1, cfg).unwrap();
        for k in 0..3000 {
            let sarcastic = k % 3 == 0;
            let text = if sarcastic {
                "oh great another sequel"
            } else {
                "a moving film"
            };
            o.learn(0, &ctx(0.8, text), !sarcastic);
        }
        assert!(o.p_disagree(0, &ctx(0.8, "oh great another remake")) > 0.5);
        assert!(o.p_disagree(0, &ctx(0.8, "a moving story")) < 0.3);
    }

    /// Labels drawn so that the tier's own confidence is exactly right, with words that carry
    /// nothing: the learned correction only adds noise, and validation hands the estimate back to
    /// the calibrated prior. Where the words do carry the errors, it keeps the correction.
    #[test]
    fn validation_keeps_the_correction_only_where_it_predicts_better() {
        let cfg = DeferralConfig {
            text_features: true,
            ..quiet()
        };
        for seed in 0..4u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut noise = OclDeferral::new(1, cfg).unwrap();
            let mut signal = OclDeferral::new(1, cfg).unwrap();
            for k in 0..3000 {
                let p: f32 = 0.5 + 0.5 * rng.gen::<f32>();
                let word = format!("w{}", rng.gen_range(0..40));
                let wrong = rng.gen::<f32>() < 1.0 - p;
                noise.learn(0, &ctx(p, &word), !wrong);
                // Here one kind of input is always wrong whatever the confidence.
                let text = if k % 4 == 0 { "oh great" } else { "a film" };
                signal.learn(0, &ctx(p, text), k % 4 != 0 && !wrong);
            }
            let w = noise.correction_weight(0);
            assert!(w < 0.5, "seed {seed}: weight on a correction of noise {w}");
            let w = signal.correction_weight(0);
            assert!(
                w > 0.99,
                "seed {seed}: weight on a correction that helps {w}"
            );
            assert!(signal.p_disagree(0, &ctx(0.95, "oh great")) > 0.8);
        }
    }

    /// Below a free tier, deferring costs only what the tier above is expected to lose: the
    /// cheap tier keeps an item only if it is at least as likely to be right as the tier above.
    #[test]
    fn a_tier_below_a_free_one_keeps_only_what_it_gets_right_as_often() {
        let mut o = OclDeferral::new(2, DeferralConfig { mu: 0.3, ..quiet() }).unwrap();
        // The upper tier answers items it is 90% sure of: its cost-to-go settles near 0.1.
        for _ in 0..2000 {
            assert!(
                !o.decide(&mut ItemState::default(), 1, &ctx(0.9, "x"), 1.0)
                    .defer
            );
        }
        // Charged a whole top-tier call (c = 1) for deferring, the lower tier would keep both;
        // with the tier above free (c = 0), it keeps only what it is surer of than 90%.
        assert!(
            !o.decide(&mut ItemState::default(), 0, &ctx(0.8, "x"), 1.0)
                .defer
        );
        assert!(
            o.decide(&mut ItemState::default(), 0, &ctx(0.8, "x"), 0.0)
                .defer
        );
        assert!(
            !o.decide(&mut ItemState::default(), 0, &ctx(0.95, "x"), 0.0)
                .defer
        );
    }

    /// Below a free tier the share is not at stake: the share controller, even while it keeps
    /// everything to pay back an excess of top-tier calls, does not make the cheap tier keep
    /// items the tier above is expected to get right more often. Such items are recorded at the
    /// bottom of the controller's window (they stay whatever the threshold), not at ±1e6·x.
    #[test]
    fn below_a_free_tier_the_share_controller_does_not_decide() {
        let cfg = DeferralConfig {
            target_top_share: Some(0.2),
            ..quiet()
        };
        let mut o = OclDeferral::new(2, cfg).unwrap();
        // The upper tier keeps items it is 95% sure of (its cost-to-go settles near 0.05), while
        // every item went up: a large excess of top-tier calls, so the controller keeps all.
        for _ in 0..300 {
            let mut it = ItemState::default();
            let _ = o.decide(&mut it, 1, &ctx(0.95, "x"), 1.0);
            o.end_item(&it, true);
        }
        let mut it = ItemState::default();
        assert!(
            !o.decide(&mut it, 1, &ctx(0.6, "x"), 1.0).defer,
            "the controller keeps"
        );
        o.end_item(&it, false);
        let mut it = ItemState::default();
        assert!(
            o.decide(&mut it, 0, &ctx(0.7, "x"), 0.0).defer,
            "goes to the free tier"
        );
        o.end_item(&it, false);
        let mut it = ItemState::default();
        assert!(!o.decide(&mut it, 0, &ctx(0.99, "x"), 0.0).defer);
        o.end_item(&it, false);
    }

    /// The cost-to-go compared below a free tier is the tier above's on items the cheap tier was
    /// as sure of, capped by its average.
    #[test]
    fn the_cost_to_go_is_read_at_the_cheap_tier_s_confidence() {
        let mut o = OclDeferral::new(2, DeferralConfig { mu: 0.9, ..quiet() }).unwrap();
        let upper = |below: f32, p: f32| Context {
            signals: sig(p),
            text: "x",
            below: Some((true, below)),
        };
        // Where the cheap tier is 90% sure the upper tier is 99.5% sure; where it is 60% sure,
        // so is the upper tier (which keeps those too: μ is dear).
        for k in 0..2000 {
            let c = if k % 2 == 0 {
                upper(0.9, 0.995)
            } else {
                upper(0.6, 0.6)
            };
            assert!(!o.decide(&mut ItemState::default(), 1, &c, 1.0).defer);
        }
        // At 90% the cheap tier would keep against the average (~0.2), not against the upper
        // tier on items like this one (~0.005); at 99.9% it keeps.
        assert!(
            o.decide(&mut ItemState::default(), 0, &ctx(0.9, "x"), 0.0)
                .defer
        );
        assert!(
            !o.decide(&mut ItemState::default(), 0, &ctx(0.999, "x"), 0.0)
                .defer
        );
    }

    /// An OCL3 checkpoint (before the bucketed cost-to-go) loads, with the buckets empty.
    #[test]
    fn a_version_3_checkpoint_loads() {
        let cfg = DeferralConfig {
            target_top_share: Some(0.3),
            ..quiet()
        };
        let mut o = OclDeferral::new(2, cfg).unwrap();
        o.learn(0, &ctx(0.7, "x"), false);
        let mut buf = Vec::new();
        o.save(&mut buf).unwrap();
        let buckets = 3 * BUCKETS * 2 * 8;
        let mut v3 = buf[..buf.len() - buckets].to_vec();
        v3[..4].copy_from_slice(CHECKPOINT_MAGIC_V3);
        let mut back = OclDeferral::new(2, cfg).unwrap();
        back.load(&mut v3.as_slice()).unwrap();
        assert_eq!(
            back.p_disagree(0, &ctx(0.7, "x")),
            o.p_disagree(0, &ctx(0.7, "x"))
        );
        let mut other = buf.clone();
        other[..4].copy_from_slice(b"OCL2");
        let e = back.load(&mut other.as_slice()).unwrap_err().to_string();
        assert!(e.contains("OCL3 or OCL4"), "{e}");
    }

    /// Through the engine's trait: every cheap tier that ran learns from the top tier's label
    /// whether it agreed; the state survives a checkpoint.
    #[test]
    fn as_a_policy_it_learns_from_how_items_ended() {
        let mut o = Ocl::new(1, quiet(), 1.0).unwrap();
        let probs = [0.4f32, 0.6];
        let logits = [0.4f32.ln(), 0.6f32.ln()];
        let unsure = crate::policy::test_step(0, 1, &probs, &logits, 1, 0.6);
        let p = |o: &mut Ocl| {
            let c = o.context(&unsure);
            o.deferral.p_disagree(0, &c)
        };
        let before = p(&mut o);
        for _ in 0..500 {
            let it = ItemState::default();
            // The top tier said 0 where the cheap tier said 1.
            o.end_item(&it, &crate::policy::test_finished(1, 1, Some(0), &[unsure]));
        }
        let after = p(&mut o);
        assert!(after > before + 0.3, "{before} -> {after}");
        assert!(o.defer(&mut ItemState::default(), &unsure));
        let saved = o.save().unwrap();
        let mut back = Ocl::new(1, quiet(), 1.0).unwrap();
        back.restore(Some(&saved), 500).unwrap();
        assert_eq!(p(&mut back), after);
        assert!(Ocl::new(1, quiet(), 1.0).unwrap().restore(None, 0).is_err());
    }

    #[test]
    fn exploration_forwards_and_decays() {
        let mut o = OclDeferral::new(
            1,
            DeferralConfig {
                explore: 0.5,
                mu: 0.9,
                ..Default::default()
            },
        )
        .unwrap();
        for _ in 0..200 {
            o.learn(0, &ctx(0.99, "x"), true);
        }
        let explored = (0..2000)
            .filter(|_| {
                o.decide(&mut ItemState::default(), 0, &ctx(0.99, "x"), 1.0)
                    .explored
            })
            .count();
        // 0.5 / sqrt(1 + 200/50) ≈ 0.22
        assert!((300..600).contains(&explored), "{explored}");
    }
}
