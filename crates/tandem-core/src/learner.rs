//! The online learner everything cheap in tandem is built on: a sparse multi-class softmax
//! (logistic for two classes) over hashed features, trained one example at a time with AdaGrad.
//! Predicting and updating touch only the active features and allocate nothing.

use crate::error::CoreError;
use crate::features::FeatureVec;
use std::io::{Read, Write};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearnerConfig {
    pub bits: u32,
    pub classes: usize,
    /// AdaGrad's base step.
    pub learning_rate: f32,
    /// L2 pull towards zero applied to the touched weights at each update.
    pub l2: f32,
}

impl LearnerConfig {
    pub fn binary(bits: u32) -> Self {
        LearnerConfig {
            bits,
            classes: 2,
            learning_rate: 0.1,
            l2: 0.0,
        }
    }

    pub fn validate(&self) -> Result<(), CoreError> {
        if !(10..=28).contains(&self.bits) {
            return Err(CoreError::config(
                "bits",
                self.bits,
                "must be between 10 and 28",
            ));
        }
        if !(2..=1024).contains(&self.classes) {
            return Err(CoreError::config(
                "classes",
                self.classes,
                "must be between 2 and 1024",
            ));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(CoreError::config(
                "learning_rate",
                self.learning_rate,
                "must be positive",
            ));
        }
        if !(self.l2 >= 0.0 && self.l2.is_finite()) {
            return Err(CoreError::config("l2", self.l2, "must be zero or positive"));
        }
        Ok(())
    }
}

/// Sparse online softmax regression. Weights of one feature for all classes sit side by side, so a
/// feature costs one cache line for small class counts.
#[derive(Debug, Clone)]
pub struct OnlineSoftmax {
    cfg: LearnerConfig,
    mask: u32,
    weights: Vec<f32>,
    grad_sq: Vec<f32>,
    updates: u64,
}

const MAGIC: &[u8; 8] = b"TNDSMX01";
/// AdaGrad's accumulator starts here, which bounds the first steps.
const ACC0: f32 = 1e-2;

impl OnlineSoftmax {
    pub fn new(cfg: LearnerConfig) -> Result<Self, CoreError> {
        cfg.validate()?;
        let n = (1usize << cfg.bits) * cfg.classes;
        Ok(OnlineSoftmax {
            cfg,
            mask: (1u32 << cfg.bits) - 1,
            weights: vec![0.0; n],
            grad_sq: vec![ACC0; n],
            updates: 0,
        })
    }

    pub fn config(&self) -> LearnerConfig {
        self.cfg
    }

    pub fn classes(&self) -> usize {
        self.cfg.classes
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Writes the raw scores (logits) of every class into `logits`.
    pub fn logits(&self, x: &FeatureVec, logits: &mut [f32]) {
        let k = self.cfg.classes;
        let logits = &mut logits[..k];
        logits.fill(0.0);
        for f in x.as_slice() {
            let base = (f.index & self.mask) as usize * k;
            if let Some(w) = self.weights.get(base..base + k) {
                for (l, w) in logits.iter_mut().zip(w) {
                    *l += w * f.value;
                }
            }
        }
    }

    /// Writes the class distribution into `probs` (length = classes).
    pub fn predict(&self, x: &FeatureVec, probs: &mut [f32]) {
        self.logits(x, probs);
        softmax_in_place(&mut probs[..self.cfg.classes]);
    }

    /// Probability of class 1 of a two-class model.
    pub fn prob1(&self, x: &FeatureVec) -> f32 {
        let mut p = [0.0f32; 2];
        if self.cfg.classes == 2 {
            self.predict(x, &mut p);
        }
        p[1]
    }

    /// One AdaGrad step on cross-entropy towards `target`, scaled by `weight` (importance or
    /// confidence of the label). `probs` is the prediction made for `x` before the step, passed in
    /// so that predict-then-learn costs one dot product.
    pub fn update(&mut self, x: &FeatureVec, target: usize, weight: f32, probs: &[f32]) {
        let k = self.cfg.classes;
        if target >= k || !(weight > 0.0 && weight.is_finite()) {
            return;
        }
        let lr = self.cfg.learning_rate;
        let l2 = self.cfg.l2;
        for f in x.as_slice() {
            let base = (f.index & self.mask) as usize * k;
            let (Some(w), Some(acc)) = (
                self.weights.get_mut(base..base + k),
                self.grad_sq.get_mut(base..base + k),
            ) else {
                continue;
            };
            for c in 0..k {
                let y = if c == target { 1.0 } else { 0.0 };
                let g = weight * (probs[c] - y) * f.value + l2 * w[c];
                acc[c] += g * g;
                w[c] -= lr * g / acc[c].sqrt();
            }
        }
        self.updates += 1;
    }

    /// Predicts, then learns: the progressive-validation step. Returns the prediction made before
    /// learning in `probs`.
    pub fn learn(&mut self, x: &FeatureVec, target: usize, weight: f32, probs: &mut [f32]) {
        self.predict(x, probs);
        self.update(x, target, weight, probs);
    }

    /// Checkpoint: a small header then the weights and accumulators, little-endian.
    pub fn save(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(MAGIC)?;
        w.write_all(&self.cfg.bits.to_le_bytes())?;
        w.write_all(&(self.cfg.classes as u32).to_le_bytes())?;
        w.write_all(&self.cfg.learning_rate.to_le_bytes())?;
        w.write_all(&self.cfg.l2.to_le_bytes())?;
        w.write_all(&self.updates.to_le_bytes())?;
        for v in self.weights.iter().chain(&self.grad_sq) {
            w.write_all(&v.to_le_bytes())?;
        }
        Ok(())
    }

    pub fn load(r: &mut impl Read) -> Result<Self, CoreError> {
        let bad = |why: &str| CoreError::Tier {
            tier: "learner checkpoint".into(),
            reason: why.to_string(),
        };
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)
            .map_err(|e| bad(&format!("cannot read header: {e}")))?;
        if &magic != MAGIC {
            return Err(bad("not a tandem learner checkpoint (bad magic)"));
        }
        let mut b4 = [0u8; 4];
        let mut b8 = [0u8; 8];
        let mut u32_ = |r: &mut dyn Read| -> Result<[u8; 4], CoreError> {
            r.read_exact(&mut b4)
                .map_err(|e| bad(&format!("truncated header: {e}")))?;
            Ok(b4)
        };
        let bits = u32::from_le_bytes(u32_(r)?);
        let classes = u32::from_le_bytes(u32_(r)?) as usize;
        let learning_rate = f32::from_le_bytes(u32_(r)?);
        let l2 = f32::from_le_bytes(u32_(r)?);
        r.read_exact(&mut b8)
            .map_err(|e| bad(&format!("truncated header: {e}")))?;
        let updates = u64::from_le_bytes(b8);
        let cfg = LearnerConfig {
            bits,
            classes,
            learning_rate,
            l2,
        };
        cfg.validate()?;
        let n = (1usize << cfg.bits) * cfg.classes;
        // Read in pieces, growing with what the file really holds: a header that claims more
        // than is there fails at its end instead of allocating what it claims up front.
        let weights = read_f32s(r, n).map_err(|e| bad(&format!("weights: {e}")))?;
        let grad_sq = read_f32s(r, n).map_err(|e| bad(&format!("accumulators: {e}")))?;
        if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
            return Err(bad(&format!("weight {i} is {} (not a number)", weights[i])));
        }
        if let Some(i) = grad_sq.iter().position(|g| !(g.is_finite() && *g > 0.0)) {
            return Err(bad(&format!(
                "accumulator {i} is {} (must be positive)",
                grad_sq[i]
            )));
        }
        let m = OnlineSoftmax {
            cfg,
            mask: (1u32 << cfg.bits) - 1,
            weights,
            grad_sq,
            updates,
        };
        Ok(m)
    }
}

/// Reads `n` little-endian f32s, 64 KiB at a time.
fn read_f32s(r: &mut impl Read, n: usize) -> Result<Vec<f32>, String> {
    const PIECE: usize = 1 << 14;
    let mut out: Vec<f32> = Vec::with_capacity(n.min(PIECE));
    let mut buf = vec![0u8; PIECE * 4];
    while out.len() < n {
        let k = (n - out.len()).min(PIECE);
        r.read_exact(&mut buf[..k * 4])
            .map_err(|e| format!("truncated after {} of {n} values: {e}", out.len()))?;
        out.extend(
            buf[..k * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    Ok(out)
}

pub fn softmax_in_place(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        let n = v.len().max(1) as f32;
        v.fill(1.0 / n);
        return;
    }
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in v.iter_mut() {
        *x /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{ns, Featurizer, TextFeatures};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn words(f: &mut Featurizer, s: &str) -> FeatureVec {
        let mut v = FeatureVec::default();
        f.add_bias(&mut v);
        let cfg = TextFeatures {
            word_ngrams: 1,
            char_min: 0,
            char_max: 0,
        };
        f.add_text(ns::PROMPT, s, cfg, 1.0, &mut v);
        v
    }

    #[test]
    fn learns_a_separable_problem() {
        let mut f = Featurizer::new(16).unwrap();
        let mut m = OnlineSoftmax::new(LearnerConfig {
            bits: 16,
            classes: 3,
            learning_rate: 0.5,
            l2: 0.0,
        })
        .unwrap();
        let vocab = [
            ["red", "crimson", "scarlet"],
            ["blue", "navy", "azure"],
            ["green", "lime", "olive"],
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut probs = [0.0f32; 3];
        let mut late_errors = 0;
        for step in 0..600 {
            let y = rng.gen_range(0..3);
            let text = format!(
                "{} thing {}",
                vocab[y][rng.gen_range(0..3)],
                vocab[y][rng.gen_range(0..3)]
            );
            let x = words(&mut f, &text);
            m.learn(&x, y, 1.0, &mut probs);
            let pred = probs
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            if step >= 300 && pred != y {
                late_errors += 1;
            }
        }
        assert_eq!(late_errors, 0, "progressive errors after warm-up");
        let s: f32 = probs.iter().sum();
        assert!((s - 1.0).abs() < 1e-5);
    }

    #[test]
    fn a_lying_or_poisoned_checkpoint_is_refused_without_allocating_its_claim() {
        // A header that claims 2^28 buckets x 1,024 classes (1 TiB) over a few bytes of data.
        let mut buf = Vec::new();
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&28u32.to_le_bytes());
        buf.extend_from_slice(&1024u32.to_le_bytes());
        buf.extend_from_slice(&0.1f32.to_le_bytes());
        buf.extend_from_slice(&0.0f32.to_le_bytes());
        buf.extend_from_slice(&5u64.to_le_bytes());
        buf.extend_from_slice(&[0u8; 64]);
        let e = OnlineSoftmax::load(&mut buf.as_slice())
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated after 0 of"), "{e}");
        // NaN or infinite weights, a non-positive accumulator.
        let m = OnlineSoftmax::new(LearnerConfig::binary(10)).unwrap();
        for (which, at, v) in [
            (0, 7, f32::NAN),
            (0, 0, f32::INFINITY),
            (1, 3, 0.0),
            (1, 5, -1.0),
        ] {
            let mut b = Vec::new();
            m.save(&mut b).unwrap();
            let header = 8 + 4 * 4 + 8;
            let off = header + which * m.weights.len() * 4 + at * 4;
            b[off..off + 4].copy_from_slice(&v.to_le_bytes());
            let e = OnlineSoftmax::load(&mut b.as_slice())
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!(" {at} is ")), "{e}");
        }
        let mut b = Vec::new();
        m.save(&mut b).unwrap();
        assert!(OnlineSoftmax::load(&mut b.as_slice()).is_ok());
    }

    #[test]
    fn binary_probability_tracks_the_base_rate() {
        // Only a bias feature and labels that are 1 a quarter of the time: p must approach 0.25.
        let mut f = Featurizer::new(12).unwrap();
        let mut m = OnlineSoftmax::new(LearnerConfig::binary(12)).unwrap();
        let mut x = FeatureVec::default();
        f.add_bias(&mut x);
        let mut probs = [0.0f32; 2];
        for i in 0..4000 {
            m.learn(&x, usize::from(i % 4 == 0), 1.0, &mut probs);
        }
        let p = m.prob1(&x);
        assert!((p - 0.25).abs() < 0.05, "p = {p}");
        let _ = &mut f;
    }

    #[test]
    fn checkpoint_round_trip() {
        let mut f = Featurizer::new(12).unwrap();
        let mut m = OnlineSoftmax::new(LearnerConfig::binary(12)).unwrap();
        let x = words(&mut f, "some words here");
        let mut p = [0.0f32; 2];
        for _ in 0..10 {
            m.learn(&x, 1, 1.0, &mut p);
        }
        let mut buf = Vec::new();
        m.save(&mut buf).unwrap();
        let back = OnlineSoftmax::load(&mut buf.as_slice()).unwrap();
        assert_eq!(back.prob1(&x), m.prob1(&x));
        assert_eq!(back.updates(), 10);
        assert!(OnlineSoftmax::load(&mut &buf[..20]).is_err());
        assert!(OnlineSoftmax::load(&mut &b"garbage-garbage-garbage"[..]).is_err());
    }
}
