//! The switching controller's settings, validated before use.

use crate::error::CoreError;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwitchConfig {
    /// c: what one large-model call costs, in units of task reward (LONDI's switching cost).
    pub cost: f32,
    /// LONDI-B: at most this many large calls per episode; none = unbounded (plain LONDI).
    pub budget: Option<u32>,
    /// Initial value of calling the large model over the small one (the bias weight of Q(large)).
    /// Positive starts the controller near always-large, so what it learns is where the small
    /// model suffices: with a sparse end-of-task reward that is far easier to discover than the
    /// other way round, and it keeps quality while it learns.
    pub optimism: f32,
    /// Discount per step.
    pub gamma: f32,
    /// Step of the normalised least-mean-squares update of Q.
    pub learning_rate: f32,
    /// Rewards summed before bootstrapping from the target Q (n-step returns carry a late reward
    /// back faster than one-step Q-learning).
    pub n_step: u32,
    /// ε-greedy exploration: from `epsilon_start`, down linearly over `epsilon_decay_episodes`
    /// finished episodes to `epsilon_end`.
    pub epsilon_start: f32,
    pub epsilon_end: f32,
    pub epsilon_decay_episodes: u32,
    /// Transitions kept for replay; the oldest are dropped first.
    pub replay_capacity: usize,
    /// Minibatch size and number of minibatch updates per finished step.
    pub batch: usize,
    pub updates_per_step: u32,
    /// Updates between copies of Q into the target used for bootstrapping.
    pub target_sync: u32,
    /// 2^hash_bits weights per action.
    pub hash_bits: u32,
    /// Steps at which the step-index feature saturates.
    pub horizon: u32,
    /// Open episodes kept; beyond this the least recently used one is ended as it stands.
    pub max_open_episodes: usize,
    pub seed: u64,
    /// Where the front end says the large model chose the very action the small one proposed
    /// ([`super::SwitchController::agreed`]), the step is also learned as a choice of the small
    /// model with the same outcome and no switching cost: the environment saw the same action,
    /// so that counterfactual is exact, and it teaches Q where a large call changes nothing.
    pub counterfactual: bool,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            cost: 0.05,
            budget: None,
            optimism: 0.0,
            gamma: 0.95,
            learning_rate: 0.03,
            n_step: 4,
            epsilon_start: 0.3,
            epsilon_end: 0.02,
            epsilon_decay_episodes: 200,
            replay_capacity: 50_000,
            batch: 16,
            updates_per_step: 2,
            target_sync: 200,
            hash_bits: 16,
            horizon: 40,
            max_open_episodes: 10_000,
            seed: 0,
            counterfactual: true,
        }
    }
}

impl SwitchConfig {
    pub fn validate(&self) -> Result<(), CoreError> {
        let unit = |v: f32| (0.0..=1.0).contains(&v);
        if !(self.cost.is_finite() && self.cost >= 0.0) {
            return Err(CoreError::config(
                "cost",
                self.cost,
                "must be zero or positive",
            ));
        }
        if !self.optimism.is_finite() {
            return Err(CoreError::config(
                "optimism",
                self.optimism,
                "must be finite",
            ));
        }
        if !(self.gamma > 0.0 && self.gamma <= 1.0) {
            return Err(CoreError::config("gamma", self.gamma, "must be in (0, 1]"));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate <= 1.0) {
            return Err(CoreError::config(
                "learning_rate",
                self.learning_rate,
                "must be in (0, 1]",
            ));
        }
        if !(1..=1000).contains(&self.n_step) {
            return Err(CoreError::config(
                "n_step",
                self.n_step,
                "must be 1 to 1000",
            ));
        }
        if !unit(self.epsilon_start) || !unit(self.epsilon_end) {
            return Err(CoreError::config(
                "epsilon_start/epsilon_end",
                format!("{}/{}", self.epsilon_start, self.epsilon_end),
                "must be in [0, 1]",
            ));
        }
        if self.replay_capacity == 0 || self.batch == 0 {
            return Err(CoreError::config(
                "replay_capacity/batch",
                format!("{}/{}", self.replay_capacity, self.batch),
                "must be positive",
            ));
        }
        if self.target_sync == 0 {
            return Err(CoreError::config("target_sync", 0, "must be positive"));
        }
        if !(10..=24).contains(&self.hash_bits) {
            return Err(CoreError::config(
                "hash_bits",
                self.hash_bits,
                "must be between 10 and 24",
            ));
        }
        if self.horizon == 0 || self.max_open_episodes == 0 {
            return Err(CoreError::config(
                "horizon/max_open_episodes",
                format!("{}/{}", self.horizon, self.max_open_episodes),
                "must be positive",
            ));
        }
        Ok(())
    }

    /// ε after `episodes` finished episodes.
    pub fn epsilon(&self, episodes: u64) -> f32 {
        let d = self.epsilon_decay_episodes.max(1) as f32;
        let t = (episodes as f32 / d).min(1.0);
        self.epsilon_start + (self.epsilon_end - self.epsilon_start) * t
    }
}
