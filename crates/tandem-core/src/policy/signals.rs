//! What a tier's class distribution says about how far to trust it: the top probability, the margin
//! to the runner-up, the entropy, and the energy of its logits (E-LANG: E(x) = −T·logsumexp(f(x)/T);
//! low energy = in-distribution and confident, high energy = out of its depth).

/// E(x) = −T·logsumexp(logits / T).
pub fn energy(logits: &[f32], temperature: f32) -> f32 {
    let t = if temperature > 0.0 && temperature.is_finite() {
        temperature
    } else {
        1.0
    };
    let max = logits
        .iter()
        .map(|l| l / t)
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return f32::INFINITY;
    }
    let sum: f32 = logits.iter().map(|l| (l / t - max).exp()).sum();
    -t * (max + sum.ln())
}

/// Per-token energies of a generated answer, summarised (mean, max) — the generation form of E-LANG.
pub fn token_energy_summary(token_energies: &[f32]) -> Option<(f32, f32)> {
    if token_energies.is_empty() {
        return None;
    }
    let mean = token_energies.iter().sum::<f32>() / token_energies.len() as f32;
    let max = token_energies
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    Some((mean, max))
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Signals {
    pub max_prob: f32,
    pub margin: f32,
    /// Entropy in nats, divided by ln(classes) so it lies in [0, 1].
    pub entropy: f32,
    pub energy: f32,
}

impl Signals {
    /// A cheap tier's signals: from its class distribution, or — for a generated answer, which
    /// has none — from its confidence (the geometric mean of its tokens' probabilities) and
    /// mean token energy (0 when its tier gave none).
    pub fn of_step(step: &super::Step, temperature: f32) -> Signals {
        if !step.probs.is_empty() {
            return Signals::of(step.probs, step.logits, temperature);
        }
        let c = step.confidence.clamp(0.0, 1.0);
        Signals {
            max_prob: c,
            margin: c,
            entropy: 1.0 - c,
            energy: step.token_energy.unwrap_or(0.0),
        }
    }

    pub fn of(probs: &[f32], logits: &[f32], temperature: f32) -> Signals {
        let mut top = [0.0f32, 0.0];
        for &p in probs {
            if p > top[0] {
                top = [p, top[0]];
            } else if p > top[1] {
                top[1] = p;
            }
        }
        let h: f32 = probs
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| -p * p.ln())
            .sum();
        let norm = (probs.len().max(2) as f32).ln();
        Signals {
            max_prob: top[0],
            margin: top[0] - top[1],
            entropy: h / norm,
            energy: energy(logits, temperature),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn energy_by_hand() {
        // −logsumexp([0, 0]) = −ln 2.
        assert!((energy(&[0.0, 0.0], 1.0) + 2f32.ln()).abs() < 1e-6);
        // Confident, large logits have lower energy than flat, small ones.
        assert!(energy(&[8.0, -8.0], 1.0) < energy(&[0.1, -0.1], 1.0));
        // T scales: −2·logsumexp([2, 2]/2) = −2·(1 + ln 2).
        assert!((energy(&[2.0, 2.0], 2.0) + 2.0 * (1.0 + 2f32.ln())).abs() < 1e-5);
        assert_eq!(token_energy_summary(&[-1.0, -3.0]), Some((-2.0, -1.0)));
        assert_eq!(token_energy_summary(&[]), None);
    }

    #[test]
    fn signals_by_hand() {
        let s = Signals::of(&[0.7, 0.2, 0.1], &[2.0, 0.75, 0.05], 1.0);
        assert!((s.max_prob - 0.7).abs() < 1e-6 && (s.margin - 0.5).abs() < 1e-6);
        assert!(s.entropy > 0.0 && s.entropy < 1.0);
        let flat = Signals::of(&[0.5, 0.5], &[0.0, 0.0], 1.0);
        assert!((flat.entropy - 1.0).abs() < 1e-6 && flat.margin == 0.0);
    }
}
