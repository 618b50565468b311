//! What the share-holding gates have in common: one threshold for every cheap tier over a score
//! where higher means "send it up", held online so that a target share of the items reach the top
//! tier. An item goes up only when every cheap tier's score is above the threshold, so the share
//! controller watches the lowest score along each item's path. (Splitting the share per tier
//! instead lets a weak first tier answer a fixed share whatever it knows.) The scores themselves
//! are the papers': E-LANG's energy ([`super::energy`]) and the DS+ shunt's max probability
//! ([`super::shunt`]).

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
    #[serde(skip, default = "new_rng")]
    rng: ChaCha8Rng,
}

fn new_rng() -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(0)
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
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
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
        let draw = item.draw(&mut self.rng);
        let d = self.gate.decide(score, self.gate.target(), draw);
        item.record(score);
        d.escalate
    }

    fn end_item(&mut self, item: &ItemState, f: &Finished) {
        if let Some(m) = item.lowest {
            self.gate.record(m, f.answered == f.top);
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
            rng: new_rng(),
        };
        serde_json::to_vec(&snapshot).map_err(|e| checkpoint_error(e.to_string()))
    }

    fn restore(&mut self, saved: Option<&[u8]>, _items_done: u64) -> Result<(), CoreError> {
        let bytes = saved.ok_or_else(|| checkpoint_error("missing".into()))?;
        let mut back: ShareGates =
            serde_json::from_slice(bytes).map_err(|e| checkpoint_error(e.to_string()))?;
        if back.score != self.score {
            return Err(checkpoint_error(format!(
                "holds {:?} gates, the policy wants {:?}",
                back.score, self.score
            )));
        }
        back.rng = ChaCha8Rng::seed_from_u64(back.rng_seed);
        back.rng.set_word_pos(back.rng_pos);
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
            g.end_item(
                &it,
                &Finished {
                    query: &crate::policy::TEST_QUERY,
                    top_text: None,
                    answered,
                    top: 2,
                    top_label: None,
                    cheap: &[],
                },
            );
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
                &Finished {
                    query: &crate::policy::TEST_QUERY,
                    top_text: None,
                    answered: if d { 2 } else { 0 },
                    top: 2,
                    top_label: None,
                    cheap: &[],
                },
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
}
