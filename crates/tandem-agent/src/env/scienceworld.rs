//! ScienceWorld (Wang et al. 2022) through the bridge: 30 tasks of elementary science, each with
//! variations that its authors split into training, development and test sets. One JVM serves
//! every episode. What the bridge chooses for the admissible actions, the score and success is
//! written at the top of `bridge/scienceworld_bridge.py`.

use super::{field, parse_state, python_bridge, Environment, GameState, Split};
use crate::bridge::Bridge;
use crate::error::AgentError;
use serde::Deserialize;
use serde_json::json;
use std::path::Path;
use std::time::Duration;

/// The bridge script, embedded so the binary needs no file beside it.
pub const SCIENCEWORLD_BRIDGE: &str = include_str!("../../bridge/scienceworld_bridge.py");

/// One episode: a task by ScienceWorld's name (e.g. "boil", "find-animal") and a variation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SwEpisode {
    pub task: String,
    pub variation: u32,
}

impl SwEpisode {
    pub fn new(task: &str, variation: u32) -> Self {
        SwEpisode {
            task: task.to_string(),
            variation,
        }
    }
}

/// A task's variations, split as ScienceWorld's authors split them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Variations {
    pub task: String,
    /// How many there are (numbered 0 to count - 1).
    pub count: u32,
    pub train: Vec<u32>,
    pub dev: Vec<u32>,
    pub test: Vec<u32>,
}

impl Variations {
    pub fn split(&self, split: Split) -> &[u32] {
        match split {
            Split::Train => &self.train,
            Split::Dev => &self.dev,
            Split::Test => &self.test,
        }
    }
}

/// How episodes are played.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwConfig {
    /// An episode is done after this many moves.
    pub step_limit: u32,
    /// At most this many admissible actions a step (0: all of ScienceWorld's valid ones, which
    /// run to 1,600 in a full kitchen). The bridge says which it keeps.
    pub max_actions: u32,
    /// ScienceWorld's simplifications, comma-separated ("easy", "openDoors", ...); `None`: its
    /// "noElectricalAction" on tasks that need no wiring, none on those that do.
    pub simplifications: Option<String>,
}

impl Default for SwConfig {
    fn default() -> Self {
        SwConfig {
            step_limit: 100,
            max_actions: 256,
            simplifications: None,
        }
    }
}

pub struct ScienceWorld {
    bridge: Bridge,
    pub config: SwConfig,
    step_timeout: Duration,
    reset_timeout: Duration,
}

impl ScienceWorld {
    /// Starts the bridge (and with it the JVM) with ScienceWorld from `site` (the directory
    /// scripts/setup-scienceworld installs into).
    pub fn start(site: &Path, python: &Path, config: SwConfig) -> Result<Self, AgentError> {
        if !site.join("scienceworld").is_dir() || !site.join("py4j").is_dir() {
            return Err(AgentError::Missing(format!(
                "ScienceWorld is not installed in {}: run scripts/setup-scienceworld",
                site.display()
            )));
        }
        let cmd = python_bridge(site, python, SCIENCEWORLD_BRIDGE, Duration::from_secs(90));
        Ok(ScienceWorld {
            bridge: Bridge::start(&cmd, "scienceworld")?,
            config,
            step_timeout: Duration::from_secs(30),
            reset_timeout: Duration::from_secs(90),
        })
    }

    /// ScienceWorld's task names.
    pub fn tasks(&mut self) -> Result<Vec<String>, AgentError> {
        let v = self
            .bridge
            .request(&json!({"op": "tasks"}), self.step_timeout)?;
        field(v, "tasks")
    }

    /// A task's variations and their split. Ends the episode being played, if any.
    pub fn variations(&mut self, task: &str) -> Result<Variations, AgentError> {
        let v = self.bridge.request(
            &json!({"op": "variations", "task": task}),
            self.reset_timeout,
        )?;
        serde_json::from_value(v)
            .map_err(|e| AgentError::Env(format!("{task}'s variations are malformed: {e}")))
    }

    pub fn reset(&mut self, episode: &SwEpisode) -> Result<GameState, AgentError> {
        self.reset_with(episode, false)
    }

    /// Resets and also returns the gold action sequence ScienceWorld generates for the episode
    /// (a winning path; its commands are ScienceWorld's and need not be among the admissible
    /// actions word for word).
    pub fn reset_with_gold(
        &mut self,
        episode: &SwEpisode,
    ) -> Result<(GameState, Vec<String>), AgentError> {
        let state = self.reset_with(episode, true)?;
        let v = self
            .bridge
            .request(&json!({"op": "gold"}), self.step_timeout)?;
        Ok((state, field(v, "actions")?))
    }

    fn reset_with(&mut self, episode: &SwEpisode, gold: bool) -> Result<GameState, AgentError> {
        let v = self.bridge.request(
            &json!({"op": "reset", "task": episode.task, "variation": episode.variation,
                    "step_limit": self.config.step_limit, "max_actions": self.config.max_actions,
                    "simplifications": self.config.simplifications, "gold": gold}),
            self.reset_timeout,
        )?;
        parse_state(v)
    }

    pub fn step(&mut self, action: &str) -> Result<GameState, AgentError> {
        let v = self
            .bridge
            .request(&json!({"op": "step", "action": action}), self.step_timeout)?;
        parse_state(v)
    }
}

impl Environment for ScienceWorld {
    type Episode = SwEpisode;
    fn name(episode: &SwEpisode) -> String {
        format!("{}/{}", episode.task, episode.variation)
    }
    fn reset(&mut self, episode: &SwEpisode) -> Result<GameState, AgentError> {
        ScienceWorld::reset(self, episode)
    }
    fn step(&mut self, action: &str) -> Result<GameState, AgentError> {
        ScienceWorld::step(self, action)
    }
}
