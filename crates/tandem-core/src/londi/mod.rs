//! LONDI (Chen, Du, Mguni 2024): a switching controller that learns, by reinforcement learning, in
//! which states of a multi-step task to hand the step to the large model instead of the small one,
//! paying a cost c per large call. LONDI-B adds a hard per-episode budget of large calls: the
//! remaining budget is part of the state, and at zero the large model cannot be chosen at all.
//!
//! The controller is Q-learning with linear function approximation over hashed features of the
//! state (its text, the step index, the remaining budget, the small policy's confidence), n-step
//! returns, a replay buffer and a periodically synced target, and ε-greedy exploration that decays
//! with finished episodes.

mod config;
mod controller;
mod state;

pub use config::SwitchConfig;
pub use controller::{Decision, EpisodeSummary, SwitchController, SwitchSnapshot};
pub use state::{StateFeatures, SwitchState};

use serde::{Deserialize, Serialize};

/// Which policy acts at a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    Small,
    Large,
}

impl Switch {
    pub fn index(self) -> usize {
        match self {
            Switch::Small => 0,
            Switch::Large => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Switch::Small => "small",
            Switch::Large => "large",
        }
    }
}
