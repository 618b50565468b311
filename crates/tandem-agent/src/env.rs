//! Text games through the bridge. TextWorld here: generate (offline, with TextWorld's own
//! generator and Inform 7 compiler, both in its wheel), reset, step. ScienceWorld
//! ([`scienceworld`]) and BabyAI-Text ([`babyai`]) in their own modules, with the same
//! [`GameState`] and the [`Environment`] trait over all three.

use crate::bridge::{Bridge, BridgeCommand};
use crate::error::AgentError;
use serde::Deserialize;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod babyai;
pub mod scienceworld;

pub use babyai::{BabyAiEpisode, BabyAiText};
pub use scienceworld::{ScienceWorld, SwEpisode};

/// The bridge script, embedded so the binary needs no file beside it.
pub const TEXTWORLD_BRIDGE: &str = include_str!("../bridge/textworld_bridge.py");

/// What a game looks like at one step.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GameState {
    pub observation: String,
    pub description: String,
    pub inventory: String,
    pub objective: String,
    pub admissible: Vec<String>,
    pub score: i64,
    pub max_score: i64,
    pub moves: i64,
    pub done: bool,
    pub won: bool,
    pub lost: bool,
    /// The environment's own expert's action in this state (BabyAI's bot), when it has one.
    #[serde(default)]
    pub expert: Option<String>,
}

/// A text environment: one episode at a time, reset then stepped with one of the admissible
/// actions (or any text, which the environment answers or refuses as it defines).
pub trait Environment {
    /// What picks an episode: a game file, a task and its variation, a level and its seed.
    type Episode: ?Sized;
    /// A stable name of an episode, the same in every run (recordings are keyed by it).
    fn name(episode: &Self::Episode) -> String;
    fn reset(&mut self, episode: &Self::Episode) -> Result<GameState, AgentError>;
    fn step(&mut self, action: &str) -> Result<GameState, AgentError>;
}

/// Which part of an environment's episodes: the authors' training, development and test
/// (held-out) sets where they define them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Dev,
    Test,
}

/// How a bridge over Python packages installed in `site` starts: `python -u -c SCRIPT`.
fn python_bridge(
    site: &Path,
    python: &Path,
    script: &str,
    start_timeout: Duration,
) -> BridgeCommand {
    BridgeCommand {
        program: python.to_path_buf(),
        args: vec!["-u".into(), "-c".into(), script.into()],
        env: vec![("PYTHONPATH".into(), site.display().to_string())],
        start_timeout,
    }
}

/// A generated game: the generator's settings, of which the seed picks the world and quest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GameSpec {
    pub seed: u64,
    pub rooms: u32,
    pub objects: u32,
    pub quest_length: u32,
}

impl GameSpec {
    pub fn file_name(&self) -> String {
        format!(
            "tw-r{}-o{}-q{}-s{}.z8",
            self.rooms, self.objects, self.quest_length, self.seed
        )
    }
}

pub struct TextWorld {
    bridge: Bridge,
    step_timeout: Duration,
    make_timeout: Duration,
}

impl TextWorld {
    /// Starts the bridge with TextWorld from `site` (the directory scripts/setup-textworld
    /// installs into).
    pub fn start(site: &Path, python: &Path) -> Result<Self, AgentError> {
        if !site.join("textworld").is_dir() {
            return Err(AgentError::Missing(format!(
                "TextWorld is not installed in {}: run scripts/setup-textworld",
                site.display()
            )));
        }
        let cmd = python_bridge(site, python, TEXTWORLD_BRIDGE, Duration::from_secs(60));
        Ok(TextWorld {
            bridge: Bridge::start(&cmd, "textworld")?,
            step_timeout: Duration::from_secs(30),
            make_timeout: Duration::from_secs(180),
        })
    }

    /// Over a bridge started some other way (tests use a fake one).
    pub fn with_bridge(bridge: Bridge, step_timeout: Duration) -> Self {
        TextWorld {
            bridge,
            step_timeout,
            make_timeout: step_timeout,
        }
    }

    /// The game's file in `dir`, generated when missing.
    pub fn make(&mut self, spec: GameSpec, dir: &Path) -> Result<PathBuf, AgentError> {
        let path = dir.join(spec.file_name());
        if !path.exists() {
            std::fs::create_dir_all(dir).map_err(|e| AgentError::Io(dir.to_path_buf(), e))?;
            self.bridge.request(
                &json!({"op": "make", "seed": spec.seed, "rooms": spec.rooms,
                        "objects": spec.objects, "quest_length": spec.quest_length,
                        "path": path.display().to_string()}),
                self.make_timeout,
            )?;
        }
        Ok(path)
    }

    pub fn reset(&mut self, game: &Path) -> Result<GameState, AgentError> {
        let v = self.bridge.request(
            &json!({"op": "reset", "game": game.display().to_string()}),
            self.step_timeout,
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

impl Environment for TextWorld {
    /// The game file ([`TextWorld::make`]).
    type Episode = Path;
    fn name(game: &Path) -> String {
        game.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| game.display().to_string())
    }
    fn reset(&mut self, game: &Path) -> Result<GameState, AgentError> {
        TextWorld::reset(self, game)
    }
    fn step(&mut self, action: &str) -> Result<GameState, AgentError> {
        TextWorld::step(self, action)
    }
}

fn parse_state(v: serde_json::Value) -> Result<GameState, AgentError> {
    serde_json::from_value(v)
        .map_err(|e| AgentError::Env(format!("a game state is malformed: {e}")))
}

/// One field of a bridge's reply.
fn field<T: serde::de::DeserializeOwned>(
    mut v: serde_json::Value,
    name: &str,
) -> Result<T, AgentError> {
    let value = v
        .get_mut(name)
        .map(serde_json::Value::take)
        .unwrap_or_default();
    serde_json::from_value(value)
        .map_err(|e| AgentError::Env(format!("the bridge's {name:?} is malformed: {e}")))
}
