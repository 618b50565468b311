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
    /// Enter where the item will be answered (see [`RandomDeferral::calling_only_what_answers`]).
    direct: bool,
}

impl RandomDeferral {
    pub fn new(share: f64, seed: u64) -> Self {
        RandomDeferral {
            share,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            direct: false,
        }
    }

    /// Calls only the tier that will answer: an item enters at the last cheap tier, or at the
    /// top when drawn for it, since the tiers below would never answer. For a front end that
    /// pays for every call (the gateway); local tiers that learn from every item (`tandem run`)
    /// keep the whole walk.
    pub fn calling_only_what_answers(mut self) -> Self {
        self.direct = true;
        self
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

    fn entry(&mut self, item: &mut ItemState, _query: &crate::query::Query, top: usize) -> usize {
        match (self.direct, item.send_up) {
            (false, _) => 0,
            (true, true) => top,
            (true, false) => top.saturating_sub(1),
        }
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

    /// Calling only what answers: each item enters at the last cheap tier or at the top.
    #[test]
    fn calling_only_what_answers_enters_where_the_item_is_answered() {
        use crate::budget::Budget;
        use crate::engine::{Cascade, Hint, Reply, Tiers};
        use crate::policy::teaching::Teaching;
        use crate::query::Query;
        struct Count(Vec<u32>);
        impl Tiers for Count {
            type Error = crate::error::CoreError;
            fn count(&self) -> usize {
                self.0.len()
            }
            fn estimate(&mut self, _: usize, _: &Query) -> crate::Micros {
                1
            }
            fn warm(&mut self, _: usize) -> bool {
                true
            }
            fn updates(&mut self, _: usize) -> u64 {
                0
            }
            fn answer(
                &mut self,
                t: usize,
                _: &Query,
                _: Option<Hint>,
            ) -> Result<Reply, Self::Error> {
                self.0[t] += 1;
                Ok(Reply::generated(format!("tier {t}"), None))
            }
            fn learn(&mut self, _: usize, _: &str, _: usize, _: f32) -> Result<(), Self::Error> {
                Ok(())
            }
        }
        for (direct, calls0) in [(false, true), (true, false)] {
            let mut r = RandomDeferral::new(0.3, 3);
            if direct {
                r = r.calling_only_what_answers();
            }
            let mut c = Cascade::new(4, Box::new(r), Teaching::default()).unwrap();
            let mut t = Count(vec![0; 4]);
            for i in 0..1000 {
                c.serve(
                    &mut t,
                    &Budget::unlimited(),
                    &Query::text(i.to_string(), "x"),
                )
                .unwrap();
            }
            let [a, b, mid, top] = [t.0[0], t.0[1], t.0[2], t.0[3]];
            assert_eq!(a > 0, calls0, "{:?}", t.0);
            assert_eq!(a, b);
            // Every item is answered by the last cheap tier or the top, about 30% by the top.
            assert!((250..350).contains(&top), "{:?}", t.0);
            if direct {
                assert_eq!(mid + top, 1000, "{:?}", t.0);
            }
        }
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
