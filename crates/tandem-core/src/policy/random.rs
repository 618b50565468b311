//! Random deferral, the baseline every policy is measured against (OCL and DS+ compare with
//! it): a fixed share of the items, drawn at random, goes to the top tier; the most capable cheap
//! tier answers the rest.

use super::{Deferral, ItemState, Step};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub struct RandomDeferral {
    share: f64,
    seed: u64,
    rng: ChaCha8Rng,
}

impl RandomDeferral {
    pub fn new(share: f64, seed: u64) -> Self {
        RandomDeferral {
            share,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

impl Deferral for RandomDeferral {
    fn name(&self) -> &'static str {
        "random"
    }

    /// One draw per item, whether or not a cheap tier is warm.
    fn begin_item(&mut self, item: &mut ItemState) {
        let draw: f64 = self.rng.gen();
        item.send_up = draw < self.share;
    }

    /// Only the last cheap tier answers, and only the items not drawn for the top tier.
    fn defer(&mut self, item: &mut ItemState, step: &Step) -> bool {
        item.send_up || step.tier + 1 != step.top
    }

    /// The draws continue where the checkpoint left them: one per item done.
    fn restore(
        &mut self,
        _saved: Option<&[u8]>,
        items_done: u64,
    ) -> Result<(), crate::error::CoreError> {
        self.rng = ChaCha8Rng::seed_from_u64(self.seed);
        for _ in 0..items_done {
            let _: f64 = self.rng.gen();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ItemState;

    fn step(tier: usize) -> Step<'static> {
        crate::policy::test_step(tier, 2, &[], &[], 0, 1.0)
    }

    #[test]
    fn holds_its_share_and_only_the_last_cheap_tier_answers() {
        let mut r = RandomDeferral::new(0.3, 7);
        let mut up = 0;
        for _ in 0..10_000 {
            let mut it = ItemState::default();
            r.begin_item(&mut it);
            assert!(
                r.defer(&mut it, &step(0)),
                "the first of two cheap tiers never answers"
            );
            up += u32::from(r.defer(&mut it, &step(1)));
        }
        assert!((f64::from(up) / 10_000.0 - 0.3).abs() < 0.02, "{up}");
    }

    #[test]
    fn a_restored_run_draws_as_an_unbroken_one() {
        let draws = |r: &mut RandomDeferral, n: usize| {
            (0..n)
                .map(|_| {
                    let mut it = ItemState::default();
                    r.begin_item(&mut it);
                    r.defer(&mut it, &step(1))
                })
                .collect::<Vec<_>>()
        };
        let mut whole = RandomDeferral::new(0.5, 3);
        let all = draws(&mut whole, 100);
        let mut resumed = RandomDeferral::new(0.5, 3);
        resumed.restore(None, 40).unwrap();
        assert_eq!(draws(&mut resumed, 60), all[40..]);
    }
}
