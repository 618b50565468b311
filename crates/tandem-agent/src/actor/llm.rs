//! The large policy: a local GGUF instruct model reads the goal, the recent commands, the room and
//! the admissible commands, and each command is scored as its answer. The prompt runs once and its
//! KV cache serves every candidate, so a step costs one prompt pass plus a few tokens per command.
//! Scores are recorded by a hash of (model, prompt, candidates), so reruns replay them.

use super::{Choice, Context};
use crate::error::AgentError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tandem_core::Message;
use tandem_models::gguf::GgufLm;
use xxhash_rust::xxh3::xxh3_64;

/// What the large policy has cost so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LlmCost {
    /// Steps it was asked for.
    pub calls: u64,
    /// Of those, answered from the recording.
    pub replayed: u64,
    pub prompt_tokens: u64,
    pub action_tokens: u64,
    /// Compute seconds of the calls that ran the model.
    pub seconds: f64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Recorded {
    key: String,
    scores: Vec<f32>,
}

pub struct LlmActor {
    model: Option<GgufLm>,
    name: String,
    recorded: HashMap<u64, Vec<f32>>,
    log: Option<(PathBuf, File)>,
    cost: LlmCost,
}

/// Commands of the episode shown to the model. Two keep it out of simple back-and-forth loops;
/// more would make nearly every prompt new, and recorded scores would rarely be replayed.
const MAX_HISTORY: usize = 2;
const MAX_OBSERVATION: usize = 600;

impl LlmActor {
    /// `model` none: replay only (a state missing from the recording is an error).
    /// `recording`: a JSON-lines file of scores, read if present and appended to.
    pub fn new(
        model: Option<GgufLm>,
        name: &str,
        recording: Option<&Path>,
    ) -> Result<Self, AgentError> {
        let mut recorded = HashMap::new();
        let mut log = None;
        if let Some(path) = recording {
            if path.exists() {
                let f = File::open(path).map_err(|e| AgentError::Io(path.to_path_buf(), e))?;
                for (i, line) in BufReader::new(f).lines().enumerate() {
                    let line = line.map_err(|e| AgentError::Io(path.to_path_buf(), e))?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let bad = |message: String| AgentError::Recording {
                        path: path.to_path_buf(),
                        line: i + 1,
                        message,
                    };
                    let r: Recorded =
                        serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
                    let key = u64::from_str_radix(&r.key, 16)
                        .map_err(|_| bad(format!("key `{}` is not 16 hex digits", r.key)))?;
                    if r.scores.iter().any(|s| s.is_nan()) {
                        return Err(bad("a score is NaN".into()));
                    }
                    recorded.insert(key, r.scores);
                }
            }
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| AgentError::Io(dir.to_path_buf(), e))?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| AgentError::Io(path.to_path_buf(), e))?;
            log = Some((path.to_path_buf(), f));
        }
        Ok(LlmActor {
            model,
            name: name.to_string(),
            recorded,
            log,
            cost: LlmCost::default(),
        })
    }

    pub fn cost(&self) -> LlmCost {
        self.cost
    }

    pub fn recorded(&self) -> usize {
        self.recorded.len()
    }

    pub fn prompt(ctx: &Context) -> Vec<Message> {
        let recent = &ctx.history[ctx.history.len().saturating_sub(MAX_HISTORY)..];
        let history = if recent.is_empty() {
            "none yet".to_string()
        } else {
            recent.join(", ")
        };
        let obs = tail_chars(ctx.observation.trim(), MAX_OBSERVATION);
        let commands: String = ctx.admissible.iter().map(|a| format!("- {a}\n")).collect();
        let user = format!(
            "Goal: {}\n\nYour last commands: {history}\n\nWhat the game just said: {obs}\n\n\
             Where you are: {}\n\nYou carry: {}\n\nCommands you can use now:\n{commands}\n\
             Which one command brings you closest to the goal? Answer with the command only.",
            ctx.objective.trim(),
            tail_chars(ctx.description.trim(), MAX_OBSERVATION),
            ctx.inventory.trim(),
        );
        vec![
            Message {
                role: "system".into(),
                content: "You play a text adventure game step by step.".into(),
            },
            Message {
                role: "user".into(),
                content: user,
            },
        ]
    }

    /// Scores every admissible action (log-likelihood of the action, then end of turn).
    pub fn choose(&mut self, ctx: &Context) -> Result<Choice, AgentError> {
        if ctx.admissible.is_empty() {
            return Err(AgentError::Env(
                "no admissible action to choose from".into(),
            ));
        }
        let messages = Self::prompt(ctx);
        let rendered: String = messages
            .iter()
            .map(|m| format!("{}\u{0}{}\u{0}", m.role, m.content))
            .collect();
        let key = xxh3_64(
            format!(
                "{}\u{1}{rendered}\u{1}{}",
                self.name,
                ctx.admissible.join("\n")
            )
            .as_bytes(),
        );
        self.cost.calls += 1;
        if let Some(scores) = self.recorded.get(&key) {
            if scores.len() == ctx.admissible.len() {
                self.cost.replayed += 1;
                return Ok(Choice::from_scores(scores));
            }
        }
        let Some(model) = &self.model else {
            return Err(AgentError::Missing(format!(
                "a state is not in the recording of {} and no model is loaded to score it",
                self.name
            )));
        };
        let t = Instant::now();
        let prompt = model.chat_prompt(&messages)?;
        let (cache, next, prompt_tokens) = model.prefill(&prompt)?;
        let end = model.tokenizer.eos.first().copied();
        let cands: Vec<Vec<u32>> = ctx
            .admissible
            .iter()
            .map(|a| {
                let mut ids = model.tokenizer.encode(a)?;
                ids.extend(end);
                Ok(ids)
            })
            .collect::<Result<_, tandem_models::gguf::GgufError>>()?;
        let scores = model.score_continuations(&cache, &next, &cands)?;
        self.cost.seconds += t.elapsed().as_secs_f64();
        self.cost.prompt_tokens += prompt_tokens as u64;
        self.cost.action_tokens += cands.iter().map(|c| c.len() as u64).sum::<u64>();
        // −∞ (a token outside the vocabulary) would poison the softmax; floor it.
        let scores: Vec<f32> = scores.into_iter().map(|s| s.max(-1e4)).collect();
        if let Some((path, f)) = &mut self.log {
            let line = serde_json::to_string(&Recorded {
                key: format!("{key:016x}"),
                scores: scores.clone(),
            })
            .map_err(|e| AgentError::Env(e.to_string()))?;
            writeln!(f, "{line}").map_err(|e| AgentError::Io(path.clone(), e))?;
        }
        self.recorded.insert(key, scores.clone());
        Ok(Choice::from_scores(&scores))
    }
}

fn tail_chars(s: &str, n: usize) -> &str {
    let count = s.chars().count();
    if count <= n {
        return s;
    }
    match s.char_indices().nth(count - n) {
        Some((i, _)) => &s[i..],
        None => s,
    }
}
