//! BabyAI-Text (Carta et al. 2023): BabyAI's grid levels (Farama's minigrid) seen through text —
//! the mission, then sentences like "You see a red ball 1 step left and 2 steps forward" — and
//! played with six actions in words. A level and a seed fix an episode. How the bridge renders a
//! view and scores an episode is written at the top of `bridge/babyai_bridge.py`.

use super::{field, parse_state, python_bridge, Environment, GameState, Split};
use crate::bridge::Bridge;
use crate::error::AgentError;
use serde_json::json;
use std::path::Path;
use std::time::Duration;

/// The bridge script, embedded so the binary needs no file beside it.
pub const BABYAI_BRIDGE: &str = include_str!("../../bridge/babyai_bridge.py");

/// BabyAI-Text's actions, the admissible ones at every step.
pub const ACTIONS: [&str; 6] = [
    "turn left",
    "turn right",
    "go forward",
    "pick up",
    "drop",
    "toggle",
];

/// The first seed of each split: a level's episodes with seeds from 0 are for training, from
/// 1,000,000 for development and from 2,000,000 held out for tests (a seed draws the room, the
/// objects and the mission).
const SPLIT_STRIDE: u64 = 1_000_000;

/// One episode: a BabyAI level by its gymnasium id (e.g. "BabyAI-GoToLocal-v0") and a seed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BabyAiEpisode {
    pub level: String,
    pub seed: u64,
}

impl BabyAiEpisode {
    pub fn new(level: &str, seed: u64) -> Self {
        BabyAiEpisode {
            level: level.to_string(),
            seed,
        }
    }
}

pub struct BabyAiText {
    bridge: Bridge,
    /// An episode is done after this many moves (or sooner, at the level's own limit).
    pub step_limit: u32,
    step_timeout: Duration,
}

impl BabyAiText {
    /// Starts the bridge with minigrid from `site` (the directory scripts/setup-babyai installs
    /// into).
    pub fn start(site: &Path, python: &Path, step_limit: u32) -> Result<Self, AgentError> {
        if !site.join("minigrid").is_dir() || !site.join("gymnasium").is_dir() {
            return Err(AgentError::Missing(format!(
                "BabyAI (minigrid) is not installed in {}: run scripts/setup-babyai",
                site.display()
            )));
        }
        let cmd = python_bridge(site, python, BABYAI_BRIDGE, Duration::from_secs(60));
        Ok(BabyAiText {
            bridge: Bridge::start(&cmd, "babyai")?,
            step_limit,
            step_timeout: Duration::from_secs(30),
        })
    }

    /// BabyAI-Text's levels as minigrid ships them: go to, pick up, put next to, unlock.
    pub fn levels(&mut self) -> Result<Vec<String>, AgentError> {
        let v = self
            .bridge
            .request(&json!({"op": "levels"}), self.step_timeout)?;
        field(v, "levels")
    }

    /// Every BabyAI level minigrid registers (what `--tasks` may name).
    pub fn all_levels(&mut self) -> Result<Vec<String>, AgentError> {
        let v = self
            .bridge
            .request(&json!({"op": "levels"}), self.step_timeout)?;
        field(v, "all")
    }

    /// The `count` first seeds of a split.
    pub fn seeds(split: Split, count: u64) -> Vec<u64> {
        let first = match split {
            Split::Train => 0,
            Split::Dev => SPLIT_STRIDE,
            Split::Test => 2 * SPLIT_STRIDE,
        };
        (first..first + count.min(SPLIT_STRIDE)).collect()
    }

    pub fn reset(&mut self, episode: &BabyAiEpisode) -> Result<GameState, AgentError> {
        let v = self.bridge.request(
            &json!({"op": "reset", "level": episode.level, "seed": episode.seed,
                    "step_limit": self.step_limit}),
            self.step_timeout,
        )?;
        parse_state(v)
    }

    /// One of [`ACTIONS`]; any other text is an [`AgentError::Env`] naming them.
    pub fn step(&mut self, action: &str) -> Result<GameState, AgentError> {
        let v = self
            .bridge
            .request(&json!({"op": "step", "action": action}), self.step_timeout)?;
        parse_state(v)
    }
}

impl Environment for BabyAiText {
    type Episode = BabyAiEpisode;
    fn name(episode: &BabyAiEpisode) -> String {
        format!("{}/{}", episode.level, episode.seed)
    }
    fn reset(&mut self, episode: &BabyAiEpisode) -> Result<GameState, AgentError> {
        BabyAiText::reset(self, episode)
    }
    fn step(&mut self, action: &str) -> Result<GameState, AgentError> {
        BabyAiText::step(self, action)
    }
}
