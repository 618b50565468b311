//! Issue 14, item 5: at a low top-tier share, a cheap tier under a free, better one must not keep
//! what the free tier would answer better. Synthetic three-tier streams (a cheap tier, a free
//! tier above it that is better, a priced top tier) of several kinds, several seeds, through the
//! real engine: OCL and the share-held gates (the DS+ shunt, E-LANG's energy) are at least as accurate as random deferral at the same share (which lets the
//! best cheap tier answer everything it does not send up), and its cheapest tier answers only a
//! little. The streams are seeded, so the numbers are exact; the margins are
//! there so that a small change to a policy does not flip them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tandem_core::engine::{Cascade, Hint, Reply, Tiers};
use tandem_core::policy::energy::energy_gate;
use tandem_core::policy::ocl::{DeferralConfig, Ocl};
use tandem_core::policy::random::RandomDeferral;
use tandem_core::policy::shunt::max_prob_gate;
use tandem_core::policy::teaching::Teaching;
use tandem_core::policy::Deferral;
use tandem_core::{Budget, CoreError, Micros, Query};

/// One item: its gold label and, per tier, (right, confidence).
struct Item {
    gold: usize,
    tiers: [(bool, f32); 3],
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// The cheap tier is sure of nearly everything, right on 62%; the free tier's confidence
    /// tells its errors apart.
    Overconfident,
    /// One latent difficulty drives every tier; the cheap tier is overconfident on hard items.
    SharedDifficulty,
    /// Every tier is calibrated; the cheap one is just weaker.
    Calibrated,
}

fn stream(kind: Kind, seed: u64, n: usize) -> Vec<Item> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x10_5a_e5);
    (0..n)
        .map(|_| {
            let gold = rng.gen_range(0..2);
            let mut u = |a: f32, b: f32| a + (b - a) * rng.gen::<f32>();
            let tiers = match kind {
                Kind::Overconfident => {
                    let h = u(0.0, 1.0) < 0.62;
                    let hc = if h { u(0.75, 1.0) } else { u(0.7, 1.0) };
                    let m = u(0.0, 1.0) < 0.8;
                    let mc = if m { u(0.7, 1.0) } else { u(0.5, 0.8) };
                    [(h, hc), (m, mc), (u(0.0, 1.0) < 0.92, 0.95)]
                }
                Kind::SharedDifficulty => {
                    let d = u(0.0, 1.0);
                    let h = u(0.0, 1.0) < 0.92 - 0.5 * d;
                    let hc = (0.99 - 0.3 * d + u(-0.1, 0.1)).clamp(0.5, 0.999);
                    let m = u(0.0, 1.0) < 0.97 - 0.35 * d;
                    let mc = (0.99 - 0.45 * d + u(-0.05, 0.05)).clamp(0.5, 0.999);
                    [(h, hc), (m, mc), (u(0.0, 1.0) < 0.98 - 0.12 * d, 0.95)]
                }
                Kind::Calibrated => {
                    let hc = u(0.5, 1.0);
                    let mc = u(0.6, 1.0);
                    [
                        (u(0.0, 1.0) < hc, hc),
                        (u(0.0, 1.0) < mc, mc),
                        (u(0.0, 1.0) < 0.92, 0.95),
                    ]
                }
            };
            Item { gold, tiers }
        })
        .collect()
}

/// The items' tiers: the cheap and the free one warm after `WARMUP` labels from the top tier.
struct Synthetic<'a> {
    items: &'a [Item],
    now: usize,
    learned: [u64; 3],
}

const WARMUP: u64 = 100;

impl Tiers for Synthetic<'_> {
    type Error = CoreError;
    fn count(&self) -> usize {
        3
    }
    fn estimate(&mut self, tier: usize, _: &Query) -> Micros {
        [0, 0, 100][tier]
    }
    fn warm(&mut self, tier: usize) -> bool {
        self.learned[tier] >= WARMUP
    }
    fn updates(&mut self, tier: usize) -> u64 {
        self.learned[tier]
    }
    fn answer(&mut self, tier: usize, _: &Query, _: Option<Hint>) -> Result<Reply, CoreError> {
        let item = &self.items[self.now];
        let (right, conf) = item.tiers[tier];
        let label = if right { item.gold } else { 1 - item.gold };
        let mut probs = vec![1.0 - conf; 2];
        probs[label] = conf;
        // A two-class softmax head's logits: centred, as one trained from zero keeps them (not
        // log-probabilities, whose energy −logsumexp(ln p) is 0 for every item).
        let half = 0.5 * (conf / (1.0 - conf)).ln();
        let mut logits = vec![-half; 2];
        logits[label] = half;
        Ok(Reply {
            cost: [0, 0, 100][tier],
            ..Reply::classes(probs, logits)
        })
    }
    fn learn(&mut self, tier: usize, _: &str, _: usize, _: f32) -> Result<(), CoreError> {
        self.learned[tier] += 1;
        Ok(())
    }
}

/// Accuracy, top-tier share and the cheapest tier's share of answers.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    accuracy: f64,
    top: f64,
    cheapest: f64,
}

fn run(items: &[Item], policy: Box<dyn Deferral>) -> Outcome {
    let mut cascade = Cascade::new(3, policy, Teaching::default()).unwrap();
    let mut tiers = Synthetic {
        items,
        now: 0,
        learned: [0; 3],
    };
    let budget = Budget::unlimited();
    let (mut right, mut top, mut cheapest) = (0usize, 0usize, 0usize);
    for (k, item) in items.iter().enumerate() {
        tiers.now = k;
        let q = Query::text(k.to_string(), format!("item {}", k % 50));
        let s = cascade.serve(&mut tiers, &budget, &q).unwrap();
        right += usize::from(s.label == item.gold);
        top += usize::from(s.tier == 2);
        cheapest += usize::from(s.tier == 0);
    }
    let n = items.len() as f64;
    Outcome {
        accuracy: right as f64 / n,
        top: top as f64 / n,
        cheapest: cheapest as f64 / n,
    }
}

fn ocl(share: f64, seed: u64) -> Box<dyn Deferral> {
    let cfg = DeferralConfig {
        target_top_share: Some(share),
        seed,
        ..Default::default()
    };
    Box::new(Ocl::new(2, cfg, 1.0).unwrap())
}

const KINDS: [Kind; 3] = [
    Kind::Overconfident,
    Kind::SharedDifficulty,
    Kind::Calibrated,
];
const SEEDS: u64 = 4;

/// Runs `policy` and random deferral at each low share over every kind and seed; asserts the
/// policy is at least as accurate as random deferral at no larger a share, on average over the
/// seeds, and not far below it on any seed. Returns the cheapest tier's mean share of answers
/// per (kind, share).
fn at_least_random(
    name: &str,
    n: usize,
    policy: &dyn Fn(f64, u64) -> Box<dyn Deferral>,
) -> Vec<(Kind, f64, f64)> {
    let mut cheapest = Vec::new();
    for kind in KINDS {
        for share in [0.15, 0.2, 0.3] {
            let (mut acc, mut acc_random, mut top, mut top_random, mut low) =
                (0.0, 0.0, 0.0, 0.0, 0.0);
            for seed in 0..SEEDS {
                let items = stream(kind, seed, n);
                let p = run(&items, policy(share, seed));
                let r = run(&items, Box::new(RandomDeferral::new(share, seed)));
                eprintln!(
                    "{name} {kind:?} share {share} seed {seed}: accuracy {:.3} (random {:.3}), \
                     top {:.3} (random {:.3}), cheapest answers {:.3}",
                    p.accuracy, r.accuracy, p.top, r.top, p.cheapest
                );
                assert!(
                    p.accuracy >= r.accuracy - 0.03,
                    "{name} {kind:?} share {share} seed {seed}: {p:?} vs random {r:?}"
                );
                acc += p.accuracy;
                acc_random += r.accuracy;
                top += p.top;
                top_random += r.top;
                low += p.cheapest;
            }
            let k = SEEDS as f64;
            let (acc, acc_random, top, top_random) =
                (acc / k, acc_random / k, top / k, top_random / k);
            assert!(
                top <= top_random + 0.02,
                "{name} {kind:?} share {share}: top share {top:.3} vs random {top_random:.3}"
            );
            assert!(
                acc >= acc_random,
                "{name} {kind:?} share {share}: accuracy {acc:.3} below random deferral's \
                 {acc_random:.3}"
            );
            cheapest.push((kind, share, low / k));
        }
    }
    cheapest
}

#[test]
fn ocl_under_a_free_better_tier_beats_random_deferral_at_low_shares() {
    let cheapest = at_least_random("OCL", 3000, &ocl);
    for (kind, share, low) in cheapest {
        // The free tier above is better at every confidence of the cheapest tier's, so once the
        // top tier's price stops dominating (at 20% and up) the cheapest tier should answer little.
        // (On the calibrated stream its surest items are right as often as the tier above: it may
        // keep them. At 15% the tier above keeps its unsure items too, and the cheapest may beat
        // those.)
        if matches!(kind, Kind::Calibrated) || share < 0.2 {
            continue;
        }
        assert!(
            low <= 0.18,
            "OCL {kind:?} share {share}: the cheapest tier answers {low:.3}"
        );
    }
}

/// A short stream (the 1,000–1,500 items): the warm-up's top-tier calls are a large
/// part of the budget, and the cheapest tier must not be left everything while the share
/// controller makes up for them.
#[test]
fn ocl_on_short_streams_beats_random_deferral_at_low_shares() {
    at_least_random("OCL short", 1200, &ocl);
}

/// The cheapest tier's share of answers stays small where the free tier above is better at
/// every confidence of the cheapest's (see the OCL test above for why the calibrated stream and
/// the 15% share are left out).
fn answers_little(name: &str, cheapest: Vec<(Kind, f64, f64)>) {
    for (kind, share, low) in cheapest {
        if matches!(kind, Kind::Calibrated) || share < 0.2 {
            continue;
        }
        assert!(
            low <= 0.18,
            "{name} {kind:?} share {share}: the cheapest tier answers {low:.3}"
        );
    }
}

fn shunt(share: f64, seed: u64) -> Box<dyn Deferral> {
    Box::new(max_prob_gate(share, seed).unwrap())
}

fn energy(share: f64, seed: u64) -> Box<dyn Deferral> {
    Box::new(energy_gate(share, 1.0, seed).unwrap())
}

#[test]
fn the_held_shunt_under_a_free_better_tier_beats_random_deferral_at_low_shares() {
    answers_little("shunt", at_least_random("shunt", 3000, &shunt));
}

#[test]
fn the_held_energy_gate_under_a_free_better_tier_beats_random_deferral_at_low_shares() {
    answers_little("energy", at_least_random("energy", 3000, &energy));
}

#[test]
fn the_held_gates_on_short_streams_beat_random_deferral_at_low_shares() {
    at_least_random("shunt short", 1200, &shunt);
    at_least_random("energy short", 1200, &energy);
}
