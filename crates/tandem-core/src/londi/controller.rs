//! The controller: decides per step, collects each episode's trace, learns when it ends.

use super::{StateFeatures, Switch, SwitchConfig, SwitchState};
use crate::error::CoreError;
use crate::features::{Feature, FeatureVec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};

/// The controller's answer for one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub choice: Switch,
    pub q_small: f32,
    pub q_large: f32,
    /// The choice was an exploratory random one.
    pub explored: bool,
    /// The large model was not allowed: the episode's budget is spent.
    pub budget_blocked: bool,
    /// Large calls of this episode so far, this one included.
    pub large_calls: u32,
    /// Large calls left under LONDI-B, after this one.
    pub budget_left: Option<u32>,
}

/// What an ended episode did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpisodeSummary {
    pub steps: u32,
    pub large_calls: u32,
    /// Task reward only (the switching cost not subtracted).
    pub task_reward: f32,
}

#[derive(Debug, Clone)]
struct StepRecord {
    x: Vec<Feature>,
    action: Switch,
    /// Large was allowed in this state (the mask for bootstrapping into it).
    large_allowed: bool,
    task_reward: f32,
    /// The large model acted and chose what the small one proposed.
    agreed: bool,
}

#[derive(Debug, Default)]
struct Episode {
    steps: Vec<StepRecord>,
    large_calls: u32,
    last_touch: u64,
    /// Closed without learning (a step was asked not to teach).
    no_learn: bool,
}

#[derive(Debug, Clone)]
struct Transition {
    x: Vec<Feature>,
    action: usize,
    /// Discounted rewards of up to n steps, the switching cost included.
    ret: f32,
    /// The state n steps on, its mask, and γ^n; none when the episode ended first.
    next: Option<(Vec<Feature>, bool, f32)>,
}

/// Learned weights and counters: what a checkpoint holds (the replay buffer is not kept).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchSnapshot {
    pub config: SwitchConfig,
    pub episodes: u64,
    pub updates: u64,
    pub q: [Vec<f32>; 2],
}

pub struct SwitchController {
    cfg: SwitchConfig,
    features: StateFeatures,
    q: [Vec<f32>; 2],
    target: [Vec<f32>; 2],
    replay: VecDeque<Transition>,
    open: HashMap<String, Episode>,
    rng: ChaCha8Rng,
    scratch: FeatureVec,
    episodes: u64,
    updates: u64,
    clock: u64,
}

impl SwitchController {
    pub fn new(cfg: SwitchConfig) -> Result<Self, CoreError> {
        cfg.validate()?;
        let dim = 1usize << cfg.hash_bits;
        let mut features = StateFeatures::new(cfg.hash_bits, cfg.horizon)?;
        let mut q = [vec![0.0; dim], vec![0.0; dim]];
        let mut probe = FeatureVec::default();
        features.build(&SwitchState::default(), None, &mut probe);
        // The first feature is the bias (see StateFeatures::build).
        if let Some(bias) = probe.as_slice().first() {
            q[1][bias.index as usize] = cfg.optimism;
        }
        Ok(SwitchController {
            features,
            target: q.clone(),
            q,
            replay: VecDeque::new(),
            open: HashMap::new(),
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            scratch: FeatureVec::default(),
            episodes: 0,
            updates: 0,
            clock: 0,
            cfg,
        })
    }

    pub fn config(&self) -> &SwitchConfig {
        &self.cfg
    }

    pub fn episodes(&self) -> u64 {
        self.episodes
    }

    pub fn open_episodes(&self) -> usize {
        self.open.len()
    }

    pub fn epsilon(&self) -> f32 {
        self.cfg.epsilon(self.episodes)
    }

    /// The episode's steps still count against its budget, but it teaches nothing when it ends.
    pub fn exclude_from_learning(&mut self, episode: &str) {
        if let Some(e) = self.open.get_mut(episode) {
            e.no_learn = true;
        }
    }

    /// Whether an episode is open (has steps not yet learned from).
    pub fn is_open(&self, episode: &str) -> bool {
        self.open.contains_key(episode)
    }

    /// Steps taken so far in an open episode.
    pub fn steps(&self, episode: &str) -> u32 {
        self.open.get(episode).map_or(0, |e| e.steps.len() as u32)
    }

    /// Large calls made so far in an open episode.
    pub fn large_calls(&self, episode: &str) -> u32 {
        self.open.get(episode).map_or(0, |e| e.large_calls)
    }

    fn q_of(w: &[f32], x: &[Feature]) -> f32 {
        x.iter().map(|f| w[f.index as usize] * f.value).sum()
    }

    /// Chooses small or large for the next step of `episode` (opened on first use). With
    /// `explore`, an ε share of choices is random among the allowed ones. Under LONDI-B the large
    /// model is never chosen once the episode's budget is spent, explored or not.
    pub fn decide(&mut self, episode: &str, state: &SwitchState, explore: bool) -> Decision {
        self.clock += 1;
        if !self.open.contains_key(episode) && self.open.len() >= self.cfg.max_open_episodes {
            self.evict_oldest();
        }
        let used = self.open.get(episode).map_or(0, |e| e.large_calls);
        let budget = self.cfg.budget.map(|b| (b.saturating_sub(used), b));
        let large_allowed = budget.is_none_or(|(left, _)| left > 0);
        self.features.build(state, budget, &mut self.scratch);
        let x = self.scratch.as_slice().to_vec();
        let q_small = Self::q_of(&self.q[0], &x);
        let q_large = Self::q_of(&self.q[1], &x);
        let eps = self.epsilon();
        let explored = explore && large_allowed && self.rng.gen::<f32>() < eps;
        let choice = if !large_allowed {
            Switch::Small
        } else if explored {
            if self.rng.gen::<bool>() {
                Switch::Large
            } else {
                Switch::Small
            }
        } else if q_large > q_small {
            Switch::Large
        } else {
            Switch::Small
        };
        let ep = self.open.entry(episode.to_string()).or_default();
        ep.last_touch = self.clock;
        if choice == Switch::Large {
            ep.large_calls += 1;
        }
        ep.steps.push(StepRecord {
            x,
            action: choice,
            large_allowed,
            task_reward: 0.0,
            agreed: false,
        });
        Decision {
            choice,
            q_small,
            q_large,
            explored,
            budget_blocked: !large_allowed,
            large_calls: ep.large_calls,
            budget_left: self.cfg.budget.map(|b| b.saturating_sub(ep.large_calls)),
        }
    }

    /// Says that at the last step of an open episode the large model, which acted, chose the
    /// action the small one had proposed: with [`SwitchConfig::counterfactual`] the step also
    /// teaches Q(small) its outcome, without the switching cost. Ignored at a small step.
    pub fn agreed(&mut self, episode: &str) -> Result<(), CoreError> {
        let step = self
            .open
            .get_mut(episode)
            .and_then(|e| e.steps.last_mut())
            .ok_or_else(|| CoreError::config("episode", episode, "no step of it is open"))?;
        if step.action == Switch::Large {
            step.agreed = true;
        }
        Ok(())
    }

    /// Adds a task reward to the last step of an open episode.
    pub fn reward(&mut self, episode: &str, reward: f32) -> Result<(), CoreError> {
        if !reward.is_finite() {
            return Err(CoreError::config(
                "reward",
                reward,
                "must be a finite number",
            ));
        }
        let step = self
            .open
            .get_mut(episode)
            .and_then(|e| e.steps.last_mut())
            .ok_or_else(|| CoreError::config("episode", episode, "no step of it is open"))?;
        step.task_reward += reward;
        Ok(())
    }

    /// Ends an episode: its steps become n-step transitions in the replay buffer, and Q learns
    /// from minibatches of the buffer. None when the episode is unknown.
    pub fn end_episode(&mut self, episode: &str) -> Option<EpisodeSummary> {
        let ep = self.open.remove(episode)?;
        if ep.no_learn {
            return Some(EpisodeSummary {
                steps: ep.steps.len() as u32,
                large_calls: ep.large_calls,
                task_reward: ep.steps.iter().map(|s| s.task_reward).sum(),
            });
        }
        Some(self.learn_from(ep))
    }

    fn evict_oldest(&mut self) {
        let oldest = self
            .open
            .iter()
            .min_by_key(|(_, e)| e.last_touch)
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            self.end_episode(&k);
        }
    }

    fn learn_from(&mut self, ep: Episode) -> EpisodeSummary {
        let n = self.cfg.n_step as usize;
        let g = self.cfg.gamma;
        let steps = &ep.steps;
        let cost = self.cfg.cost;
        let reward =
            |s: &StepRecord| s.task_reward - if s.action == Switch::Large { cost } else { 0.0 };
        for t in 0..steps.len() {
            let end = (t + n).min(steps.len());
            let mut ret = 0.0;
            let mut disc = 1.0;
            for s in &steps[t..end] {
                ret += disc * reward(s);
                disc *= g;
            }
            // Bootstrap from the state n steps on; an episode that ended first has no value after.
            let next = steps.get(end).map(|s| (s.x.clone(), s.large_allowed, disc));
            if self.cfg.counterfactual && steps[t].agreed {
                // Small would have taken the same action: the same return, without this step's
                // switching cost (the later steps' choices stand as they were).
                self.remember(Transition {
                    x: steps[t].x.clone(),
                    action: Switch::Small.index(),
                    ret: ret + cost,
                    next: next.clone(),
                });
            }
            self.remember(Transition {
                x: steps[t].x.clone(),
                action: steps[t].action.index(),
                ret,
                next,
            });
        }
        self.episodes += 1;
        let updates = steps.len() as u64 * self.cfg.updates_per_step as u64;
        for _ in 0..updates {
            self.update_batch();
        }
        EpisodeSummary {
            steps: steps.len() as u32,
            large_calls: ep.large_calls,
            task_reward: steps.iter().map(|s| s.task_reward).sum(),
        }
    }

    fn remember(&mut self, t: Transition) {
        if self.replay.len() >= self.cfg.replay_capacity {
            self.replay.pop_front();
        }
        self.replay.push_back(t);
    }

    fn update_batch(&mut self) {
        if self.replay.is_empty() {
            return;
        }
        for _ in 0..self.cfg.batch {
            let i = self.rng.gen_range(0..self.replay.len());
            let tr = &self.replay[i];
            let boot = match &tr.next {
                Some((x2, large_ok, disc)) => {
                    let qs = Self::q_of(&self.target[0], x2);
                    let best = if *large_ok {
                        qs.max(Self::q_of(&self.target[1], x2))
                    } else {
                        qs
                    };
                    disc * best
                }
                None => 0.0,
            };
            let w = &mut self.q[tr.action];
            let td = tr.ret + boot - Self::q_of(w, &tr.x);
            // Normalised LMS: the step is scaled by the input's squared norm, so the update is
            // stable whatever the number of active features.
            let norm: f32 = tr.x.iter().map(|f| f.value * f.value).sum::<f32>() + 1e-6;
            let step = self.cfg.learning_rate * td / norm;
            for f in &tr.x {
                w[f.index as usize] += step * f.value;
            }
        }
        self.updates += 1;
        if self.updates.is_multiple_of(self.cfg.target_sync as u64) {
            self.target = self.q.clone();
        }
    }

    pub fn snapshot(&self) -> SwitchSnapshot {
        SwitchSnapshot {
            config: self.cfg.clone(),
            episodes: self.episodes,
            updates: self.updates,
            q: self.q.clone(),
        }
    }

    /// A controller resumed from a checkpoint; its weights must match its configured size.
    pub fn from_snapshot(s: SwitchSnapshot) -> Result<Self, CoreError> {
        let mut c = SwitchController::new(s.config)?;
        let dim = 1usize << c.cfg.hash_bits;
        if s.q.iter().any(|w| w.len() != dim) {
            return Err(CoreError::config(
                "q",
                format!("{}/{}", s.q[0].len(), s.q[1].len()),
                "weights do not match hash_bits",
            ));
        }
        c.target = s.q.clone();
        c.q = s.q;
        c.episodes = s.episodes;
        c.updates = s.updates;
        Ok(c)
    }
}
