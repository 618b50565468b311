//! LONDI's switching as a route-before policy of the engine (Chen, Du, Mguni 2024, "LONDI:
//! Learned Optimal Non-Deterministic Invocation"): each item is one step of an episode (an agent's
//! run, a conversation), and before any call the switching controller ([`crate::londi`]) picks
//! the small model (tier 0) or the large one (the top tier) for that step. LONDI-B's hard budget of
//! large calls per episode is the controller's: once an episode has spent it, the entry is the
//! small tier whatever Q says, explored or not.
//!
//! The item carries everything the decision reads, in [`Query::metadata`] under the keys below
//! (written by [`StepMeta::write`], read back by [`StepMeta::read`]), so
//! [`Deferral::entry`] needs nothing else:
//!
//! | key | value | if absent |
//! |---|---|---|
//! | [`EPISODE`] | the episode's id | the controller is not asked: tier 0 answers |
//! | [`STEP`] | 0-based step index | the steps the controller has seen of the episode |
//! | [`ADMISSIBLE`] | number of admissible actions | not a feature |
//! | [`SMALL_CONFIDENCE`], [`SMALL_MARGIN`] | the small policy's confidence and margin in [0, 1] | not features |
//! | [`SMALL_ENTROPY`] | the entropy of the small policy's distribution over the actions, over its maximum, in [0, 1] | not a feature |
//! | [`REVISITS`] | earlier steps of the episode in this same state (a loop) | not a feature |
//! | [`GREEDY`] | `true`: no ε-exploration at this step | explores |
//! | [`NO_LEARN`] | `true`: the episode counts against its budget but teaches nothing | learns |
//! | [`TOOLS`] | the tools offered, space-separated (the gateway sets it for every route) | none |
//!
//! The state text is the query's routing text, followed by ` [tools: …]` when tools are offered.
//!
//! Rewards and episode ends come after the items, by episode and not by item, so they do not go
//! through [`Deferral::learn_outcomes`] (which is per item): they reach the controller through
//! [`SwitchHandle`], which the front end takes from [`Switching::handle`] before it boxes the
//! policy into a [`crate::engine::Cascade`]. The controller is shared between the two behind a
//! mutex held for one decision or one update.

use super::{Deferral, ItemState, Step};
use crate::error::CoreError;
use crate::londi::{
    EpisodeSummary, Switch, SwitchConfig, SwitchController, SwitchSnapshot, SwitchState,
};
use crate::query::Query;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// The episode this item is a step of.
pub const EPISODE: &str = "londi.episode";
/// The step's 0-based index in its episode.
pub const STEP: &str = "londi.step";
/// The number of admissible actions at the step.
pub const ADMISSIBLE: &str = "londi.admissible";
/// The small policy's probability of its own choice.
pub const SMALL_CONFIDENCE: &str = "londi.small_confidence";
/// The small policy's margin over its runner-up.
pub const SMALL_MARGIN: &str = "londi.small_margin";
/// The small policy's normalised entropy over the admissible actions.
pub const SMALL_ENTROPY: &str = "londi.small_entropy";
/// How many earlier steps of the episode were in the same state.
pub const REVISITS: &str = "londi.revisits";
/// `true`: choose greedily (held-out episodes, requests that ask not to be learned from).
pub const GREEDY: &str = "londi.greedy";
/// `true`: the episode teaches the controller nothing when it ends.
pub const NO_LEARN: &str = "londi.no_learn";
/// The tools a chat request offers (the gateway's key, read by every router).
pub const TOOLS: &str = "tools";

/// One step as a front end describes it, written into and read from [`Query::metadata`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepMeta {
    pub episode: String,
    pub step: Option<u32>,
    pub admissible: Option<usize>,
    pub small_confidence: Option<f32>,
    pub small_margin: Option<f32>,
    pub small_entropy: Option<f32>,
    pub revisits: Option<u32>,
    pub greedy: bool,
    pub no_learn: bool,
}

impl StepMeta {
    /// Writes the step into `metadata` (numbers in Rust's shortest round-trip form, so the
    /// controller reads exactly the values the front end had).
    pub fn write(&self, metadata: &mut BTreeMap<String, String>) {
        metadata.insert(EPISODE.into(), self.episode.clone());
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                metadata.insert(k.into(), v);
            }
        };
        put(STEP, self.step.map(|v| v.to_string()));
        put(ADMISSIBLE, self.admissible.map(|v| v.to_string()));
        put(
            SMALL_CONFIDENCE,
            self.small_confidence.map(|v| v.to_string()),
        );
        put(SMALL_MARGIN, self.small_margin.map(|v| v.to_string()));
        put(SMALL_ENTROPY, self.small_entropy.map(|v| v.to_string()));
        put(REVISITS, self.revisits.map(|v| v.to_string()));
        put(GREEDY, self.greedy.then(|| "true".into()));
        put(NO_LEARN, self.no_learn.then(|| "true".into()));
    }

    /// The step a query describes; None without an episode. A value that does not parse is
    /// taken as absent (the front end wrote it; a feature is not worth refusing the item for).
    pub fn read(query: &Query) -> Option<StepMeta> {
        let m = &query.metadata;
        let episode = m.get(EPISODE)?.clone();
        let num = |k: &str| m.get(k).and_then(|v| v.parse::<f32>().ok());
        let yes = |k: &str| m.get(k).is_some_and(|v| v == "true");
        Some(StepMeta {
            episode,
            step: m.get(STEP).and_then(|v| v.parse().ok()),
            admissible: m.get(ADMISSIBLE).and_then(|v| v.parse().ok()),
            small_confidence: num(SMALL_CONFIDENCE),
            small_margin: num(SMALL_MARGIN),
            small_entropy: num(SMALL_ENTROPY),
            revisits: m.get(REVISITS).and_then(|v| v.parse().ok()),
            greedy: yes(GREEDY),
            no_learn: yes(NO_LEARN),
        })
    }
}

/// LONDI's switching controller as the engine's policy: route-before, per step of an episode.
pub struct Switching {
    controller: Arc<Mutex<SwitchController>>,
}

impl Switching {
    pub fn new(cfg: SwitchConfig) -> Result<Self, CoreError> {
        Ok(Switching {
            controller: Arc::new(Mutex::new(SwitchController::new(cfg)?)),
        })
    }

    /// Where rewards and episode ends go (and the controller's snapshots): kept by the front
    /// end while the policy itself is boxed in a cascade.
    pub fn handle(&self) -> SwitchHandle {
        SwitchHandle(self.controller.clone())
    }
}

/// The front end's side of a [`Switching`] policy: rewards, episode ends, snapshots.
#[derive(Clone)]
pub struct SwitchHandle(Arc<Mutex<SwitchController>>);

impl SwitchHandle {
    /// The controller, for one decision or update. A poisoned lock still holds a usable
    /// controller: it is only changed by whole decisions and updates.
    pub fn lock(&self) -> MutexGuard<'_, SwitchController> {
        lock(&self.0)
    }

    /// Adds a task reward to the last step of an open episode.
    pub fn reward(&self, episode: &str, reward: f32) -> Result<(), CoreError> {
        self.lock().reward(episode, reward)
    }

    /// Ends an episode: the controller learns from it (unless it was not to) and forgets it.
    /// None when the episode is not open.
    pub fn end_episode(&self, episode: &str) -> Option<EpisodeSummary> {
        self.lock().end_episode(episode)
    }

    /// Whether an episode has steps not yet ended.
    pub fn is_open(&self, episode: &str) -> bool {
        self.lock().is_open(episode)
    }

    pub fn snapshot(&self) -> SwitchSnapshot {
        self.lock().snapshot()
    }

    /// Resumes from a snapshot: its weights and counters, the current settings (cost, budget,
    /// ... may have been changed since it was taken). Its weights must have the current size.
    pub fn restore(&self, snap: SwitchSnapshot) -> Result<(), CoreError> {
        let mut c = self.lock();
        let cfg = c.config().clone();
        if snap.config.hash_bits != cfg.hash_bits {
            return Err(CoreError::config(
                "hash_bits",
                format!(
                    "{} (saved) / {} (now)",
                    snap.config.hash_bits, cfg.hash_bits
                ),
                "the saved controller's weights have another size",
            ));
        }
        *c = SwitchController::from_snapshot(SwitchSnapshot {
            config: cfg,
            ..snap
        })?;
        Ok(())
    }
}

fn lock(m: &Mutex<SwitchController>) -> MutexGuard<'_, SwitchController> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The controller's state text: what the query asks, and the tools it may call (which tool
/// is needed says much about how hard a step is).
fn state_text(query: &Query) -> std::borrow::Cow<'_, str> {
    let text = query.routing_text();
    match query.metadata.get(TOOLS) {
        Some(t) => format!("{text} [tools: {t}]").into(),
        None => text.into(),
    }
}

impl Deferral for Switching {
    fn name(&self) -> &'static str {
        "switching"
    }

    /// The step's model, before any call: the controller's choice, the large one (the top tier)
    /// only while the episode's budget lasts. The item remembers Q(large) − Q(small) as its score
    /// and whether the choice explored.
    fn entry(&mut self, item: &mut ItemState, query: &Query, top: usize) -> usize {
        let Some(meta) = StepMeta::read(query) else {
            return 0;
        };
        let text = state_text(query);
        let mut c = lock(&self.controller);
        let state = SwitchState {
            text: &text,
            step: meta.step.unwrap_or_else(|| c.steps(&meta.episode)),
            admissible: meta.admissible,
            small_confidence: meta.small_confidence,
            small_margin: meta.small_margin,
            small_entropy: meta.small_entropy,
            revisits: meta.revisits,
        };
        let d = c.decide(&meta.episode, &state, !meta.greedy);
        if meta.no_learn {
            c.exclude_from_learning(&meta.episode);
        }
        item.score = d.q_large - d.q_small;
        item.explored = d.explored;
        match d.choice {
            Switch::Large => top,
            Switch::Small => 0,
        }
    }

    /// The step's choice was made at entry: the small model's answer is the step's.
    fn defer(&mut self, _item: &mut ItemState, _step: &Step) -> bool {
        false
    }

    fn state_file(&self) -> Option<&'static str> {
        Some("switching.json")
    }

    /// The controller's weights and counters (open episodes and the replay buffer are not
    /// kept), as JSON.
    fn save(&self) -> Result<Vec<u8>, CoreError> {
        serde_json::to_vec(&lock(&self.controller).snapshot()).map_err(|e| CoreError::Tier {
            tier: "switching checkpoint".into(),
            reason: e.to_string(),
        })
    }

    fn restore(&mut self, saved: Option<&[u8]>, _items_done: u64) -> Result<(), CoreError> {
        let bad = |reason: String| CoreError::Tier {
            tier: "switching checkpoint".into(),
            reason,
        };
        let bytes = saved.ok_or_else(|| bad("missing".into()))?;
        let snap: SwitchSnapshot = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        self.handle().restore(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Budget;
    use crate::engine::{Cascade, Next};
    use crate::policy::teaching::Teaching;

    fn cfg() -> SwitchConfig {
        SwitchConfig {
            hash_bits: 10,
            ..SwitchConfig::default()
        }
    }

    fn step_query(episode: &str, text: &str, meta: StepMeta) -> Query {
        let mut q = Query::text(format!("{episode}/{text}"), text);
        StepMeta {
            episode: episode.into(),
            ..meta
        }
        .write(&mut q.metadata);
        q
    }

    fn entry_of(c: &mut Cascade, q: &Query) -> usize {
        match c.begin(q, vec![0; c.tiers()]) {
            Ok(w) => match w.next() {
                Next::Call { tier, .. } => tier,
                Next::Done => usize::MAX,
            },
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn metadata_round_trips_exactly() {
        let m = StepMeta {
            episode: "e".into(),
            step: Some(3),
            admissible: Some(7),
            small_confidence: Some(0.1 + 0.2),
            small_margin: Some(1.0 / 3.0),
            small_entropy: Some(0.7),
            revisits: Some(2),
            greedy: true,
            no_learn: false,
        };
        let mut q = Query::text("1", "x");
        m.write(&mut q.metadata);
        assert_eq!(StepMeta::read(&q), Some(m));
        assert_eq!(StepMeta::read(&Query::text("2", "x")), None);
    }

    #[test]
    fn entry_picks_what_the_controller_decides() {
        // A twin controller fed the same states decides the same; the entry follows it.
        let mut twin = SwitchController::new(SwitchConfig {
            optimism: 0.5,
            ..cfg()
        })
        .unwrap();
        let policy = Switching::new(SwitchConfig {
            optimism: 0.5,
            ..cfg()
        })
        .unwrap();
        let mut c = Cascade::new(3, Box::new(policy), Teaching::default()).unwrap();
        let mut larges = 0;
        for k in 0..40u32 {
            let text = format!("room {}", k % 5);
            let q = step_query(
                "e",
                &text,
                StepMeta {
                    small_confidence: Some(k as f32 / 40.0),
                    ..Default::default()
                },
            );
            let d = twin.decide(
                "e",
                &SwitchState {
                    text: &text,
                    step: k,
                    small_confidence: Some(k as f32 / 40.0),
                    ..Default::default()
                },
                true,
            );
            let want = if d.choice == Switch::Large { 2 } else { 0 };
            assert_eq!(entry_of(&mut c, &q), want, "step {k}");
            larges += usize::from(want == 2);
        }
        // Optimism starts near always-large; exploration makes some small.
        assert!(larges > 0 && larges < 40, "{larges}");
        // Without an episode, the controller is not asked: the small tier answers.
        assert_eq!(entry_of(&mut c, &Query::text("x", "no episode")), 0);
    }

    #[test]
    fn the_episode_budget_of_large_calls_is_never_exceeded() {
        // Always explore, and reward every large step: Q(large) only grows, yet each episode
        // gets at most its budget of large calls.
        let policy = Switching::new(SwitchConfig {
            cost: 0.0,
            budget: Some(3),
            epsilon_start: 1.0,
            epsilon_end: 1.0,
            optimism: 1.0,
            ..cfg()
        })
        .unwrap();
        let h = policy.handle();
        let mut c = Cascade::new(2, Box::new(policy), Teaching::default()).unwrap();
        let mut total = 0;
        for e in 0..60 {
            let ep = format!("e{e}");
            let mut large = 0;
            for k in 0..12 {
                let q = step_query(&ep, &format!("step {k}"), StepMeta::default());
                if entry_of(&mut c, &q) == 1 {
                    large += 1;
                    h.reward(&ep, 1.0).unwrap();
                }
            }
            assert!(large <= 3, "episode {ep}: {large} large calls");
            total += large;
            assert_eq!(h.end_episode(&ep).map(|s| s.large_calls), Some(large));
        }
        assert!(total > 60, "the budget should be reached often: {total}");
    }

    #[test]
    fn an_ended_episode_teaches_the_controller_and_a_no_learn_one_does_not() {
        // One step; large pays 1, small 0: after a few hundred episodes, greedy picks large.
        let policy = Switching::new(SwitchConfig {
            cost: 0.1,
            epsilon_decay_episodes: 50,
            ..cfg()
        })
        .unwrap();
        let h = policy.handle();
        let mut c = Cascade::new(2, Box::new(policy), Teaching::default()).unwrap();
        let greedy = || StepMeta {
            greedy: true,
            ..Default::default()
        };
        let first = step_query("g0", "the locked door", greedy());
        assert_eq!(entry_of(&mut c, &first), 0, "untrained, small is as good");
        h.end_episode("g0");
        for e in 0..300 {
            let ep = format!("t{e}");
            let q = step_query(&ep, "the locked door", StepMeta::default());
            if entry_of(&mut c, &q) == 1 {
                h.reward(&ep, 1.0).unwrap();
            }
            h.end_episode(&ep);
        }
        let learned = h.lock().episodes();
        assert!(learned >= 300, "{learned}");
        let q = step_query("g1", "the locked door", greedy());
        assert_eq!(entry_of(&mut c, &q), 1, "learned: large at the door");
        h.end_episode("g1");
        // An episode asked not to teach still counts, but changes no weight.
        let before = h.snapshot();
        let q = step_query(
            "quiet",
            "the locked door",
            StepMeta {
                no_learn: true,
                ..Default::default()
            },
        );
        entry_of(&mut c, &q);
        h.reward("quiet", -5.0).unwrap();
        assert!(h.end_episode("quiet").is_some());
        assert_eq!(h.snapshot(), before);
        // Unknown episodes: nothing to reward or end.
        assert!(h.reward("never", 1.0).is_err());
        assert!(h.end_episode("never").is_none());
    }

    #[test]
    fn the_step_defaults_to_the_steps_seen_and_the_small_answer_stands() {
        let policy = Switching::new(cfg()).unwrap();
        let h = policy.handle();
        let mut c = Cascade::new(2, Box::new(policy), Teaching::default()).unwrap();
        for k in 0..3 {
            entry_of(
                &mut c,
                &step_query("e", &format!("s{k}"), StepMeta::default()),
            );
        }
        assert_eq!(h.lock().steps("e"), 3);
        // Served through the engine: a small entry's answer is kept (the step was decided).
        let mut tiers = Two;
        let q = step_query(
            "e",
            "x",
            StepMeta {
                greedy: true,
                ..Default::default()
            },
        );
        let s = c.serve(&mut tiers, &Budget::unlimited(), &q).unwrap();
        assert_eq!(s.calls.len(), 1);
    }

    #[test]
    fn save_and_restore_keep_the_weights_and_take_the_current_settings() {
        let mut a = Switching::new(cfg()).unwrap();
        let h = a.handle();
        for e in 0..20 {
            let ep = format!("e{e}");
            let mut item = ItemState::default();
            a.entry(&mut item, &step_query(&ep, "x", StepMeta::default()), 1);
            h.reward(&ep, 1.0).unwrap();
            h.end_episode(&ep);
        }
        let saved = a.save().unwrap();
        let mut b = Switching::new(SwitchConfig { cost: 0.5, ..cfg() }).unwrap();
        b.restore(Some(&saved), 0).unwrap();
        let (sa, sb) = (h.snapshot(), b.handle().snapshot());
        assert_eq!((sa.q, sa.episodes), (sb.q, sb.episodes));
        assert_eq!(sb.config.cost, 0.5);
        let mut other = Switching::new(SwitchConfig {
            hash_bits: 11,
            ..cfg()
        })
        .unwrap();
        assert!(other.restore(Some(&saved), 0).is_err());
        assert!(other.restore(None, 0).is_err());
    }

    /// Two tiers that answer one class each, for free.
    struct Two;

    impl crate::engine::Tiers for Two {
        type Error = CoreError;
        fn count(&self) -> usize {
            2
        }
        fn estimate(&mut self, _: usize, _: &Query) -> crate::money::Micros {
            0
        }
        fn warm(&mut self, _: usize) -> bool {
            true
        }
        fn updates(&mut self, _: usize) -> u64 {
            0
        }
        fn answer(
            &mut self,
            tier: usize,
            _: &Query,
            _: Option<crate::engine::Hint>,
        ) -> Result<crate::engine::Reply, CoreError> {
            let mut p = vec![0.0, 0.0];
            p[tier] = 1.0;
            Ok(crate::engine::Reply::classes(p.clone(), p))
        }
        fn learn(&mut self, _: usize, _: &str, _: usize, _: f32) -> Result<(), CoreError> {
            Ok(())
        }
    }
}
