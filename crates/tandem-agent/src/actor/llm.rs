//! The large policy: a local GGUF instruct model reads the goal, the recent commands, the room and
//! the admissible commands, and each command is scored as its answer. The prompt runs once and its
//! KV cache serves every candidate, so a step costs one prompt pass plus a few tokens per command.
//! Scores are recorded by a hash of (model, prompt, candidates), so reruns replay them; or, where
//! the environment does not word its states the same in every run (ScienceWorld), by a hash of
//! (model, episode, actions taken so far) with the candidates' texts beside the scores.

use super::{Choice, Context};
use crate::error::AgentError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
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
    /// Steps it had no answer for (an expert silent in that state), answered by a fallback.
    pub unanswered: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Recorded {
    key: String,
    scores: Vec<f32>,
    /// The candidates scored, when keyed by history (their texts may differ on a replay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    actions: Option<Vec<String>>,
    /// Compute seconds the scores took, so a replay still counts what the model would cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seconds: Option<f64>,
}

struct Entry {
    scores: Vec<f32>,
    actions: Option<Vec<String>>,
    seconds: f64,
}

/// How recorded scores are found again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecordKey {
    /// By the exact prompt and candidates (TextWorld, BabyAI: the same words in every run).
    #[default]
    Prompt,
    /// By the episode, the actions taken in it and the number of candidates; candidates matched
    /// by text, and the scores replayed when every candidate of the step is among those recorded
    /// (without a model: the step's lowest recorded score for one worded differently this run)
    /// (ScienceWorld).
    History,
}

pub struct LlmActor {
    model: Option<GgufLm>,
    name: String,
    recorded: HashMap<u64, Entry>,
    log: Option<(PathBuf, File)>,
    cost: LlmCost,
    key_by: RecordKey,
    system: String,
    /// Compute seconds of the last step asked (recorded ones included).
    last_seconds: f64,
    /// The room is what the agent just saw (BabyAI): said once in the prompt.
    room_is_observation: bool,
    answer_by_letter: bool,
    /// A torn last line of the recording, dropped on loading.
    torn_line: Option<usize>,
}

const LETTERS: [&str; 26] = [
    "A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "K", "L", "M", "N", "O", "P", "Q", "R", "S",
    "T", "U", "V", "W", "X", "Y", "Z",
];

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
        let mut torn_line = None;
        if let Some(path) = recording {
            if path.exists() {
                let io = |e| AgentError::Io(path.to_path_buf(), e);
                let text = std::fs::read_to_string(path).map_err(io)?;
                // A run stopped mid-write leaves a last line without its newline: that entry is
                // dropped (and cut from the file, so the next append starts a fresh line); it is
                // scored again when needed. A damaged line elsewhere is an error.
                let complete = match text.rfind('\n') {
                    Some(i) => i + 1,
                    None => 0,
                };
                let tail = &text[complete..];
                if !tail.trim().is_empty() {
                    if serde_json::from_str::<Recorded>(tail).is_err() {
                        torn_line = Some(text[..complete].lines().count() + 1);
                        OpenOptions::new()
                            .write(true)
                            .open(path)
                            .and_then(|f| f.set_len(complete as u64))
                            .map_err(io)?;
                    } else {
                        // Whole but without its newline: the next entry starts a line of its own.
                        OpenOptions::new()
                            .append(true)
                            .open(path)
                            .and_then(|mut f| f.write_all(b"\n"))
                            .map_err(io)?;
                    }
                }
                let kept = if torn_line.is_some() {
                    &text[..complete]
                } else {
                    &text[..]
                };
                for (i, line) in kept.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let bad = |message: String| AgentError::Recording {
                        path: path.to_path_buf(),
                        line: i + 1,
                        message: format!(
                            "{message} (a damaged recording: delete this line, or the file, and \
                             the model scores those states again)"
                        ),
                    };
                    let r: Recorded = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
                    let key = u64::from_str_radix(&r.key, 16)
                        .map_err(|_| bad(format!("key `{}` is not 16 hex digits", r.key)))?;
                    if r.scores.iter().any(|s| s.is_nan()) {
                        return Err(bad("a score is NaN".into()));
                    }
                    if r.actions
                        .as_ref()
                        .is_some_and(|a| a.len() != r.scores.len())
                    {
                        return Err(bad("actions and scores differ in number".into()));
                    }
                    recorded.insert(
                        key,
                        Entry {
                            scores: r.scores,
                            actions: r.actions,
                            seconds: r.seconds.unwrap_or(0.0),
                        },
                    );
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
            key_by: RecordKey::Prompt,
            system: "You play a text adventure game step by step.".into(),
            last_seconds: 0.0,
            room_is_observation: false,
            answer_by_letter: false,
            torn_line,
        })
    }

    /// The line number of a recording's last line that an interrupted run left unfinished and
    /// that was dropped on loading (its state is scored again when needed), if there was one.
    pub fn torn_line(&self) -> Option<usize> {
        self.torn_line
    }

    /// How scores are recorded and found again.
    pub fn key_by(mut self, key_by: RecordKey) -> Self {
        self.key_by = key_by;
        self
    }

    /// The system message (what kind of game it is).
    pub fn system(mut self, system: &str) -> Self {
        self.system = system.to_string();
        self
    }

    /// Commands listed with letters and the letter scored, where there are at most 26: one token
    /// per answer, so the likelihood does not favour short commands (Qwen2.5-0.5B scoring BabyAI's
    /// commands by their words answered "pick up", the shortest, at every step).
    pub fn answer_by_letter(mut self, yes: bool) -> Self {
        self.answer_by_letter = yes;
        self
    }

    fn by_letter(&self, ctx: &Context) -> bool {
        self.answer_by_letter && ctx.admissible.len() <= LETTERS.len()
    }

    /// Leave "Where you are" out of the prompt: the environment's room is its observation.
    pub fn room_is_observation(mut self, yes: bool) -> Self {
        self.room_is_observation = yes;
        self
    }

    /// Compute seconds of the last step asked: measured, or as recorded when replayed.
    pub fn last_seconds(&self) -> f64 {
        self.last_seconds
    }

    pub fn cost(&self) -> LlmCost {
        self.cost
    }

    pub fn recorded(&self) -> usize {
        self.recorded.len()
    }

    pub fn prompt(&self, ctx: &Context) -> Vec<Message> {
        let recent = &ctx.history[ctx.history.len().saturating_sub(MAX_HISTORY)..];
        let history = if recent.is_empty() {
            "none yet".to_string()
        } else {
            recent.join(", ")
        };
        let obs = tail_chars(ctx.observation.trim(), MAX_OBSERVATION);
        let lettered = self.by_letter(ctx);
        let commands: String = ctx
            .admissible
            .iter()
            .enumerate()
            .map(|(i, a)| {
                if lettered {
                    format!("{}. {a}\n", LETTERS[i])
                } else {
                    format!("- {a}\n")
                }
            })
            .collect();
        let answer = if lettered {
            "Answer with its letter only."
        } else {
            "Answer with the command only."
        };
        let place = if self.room_is_observation {
            String::new()
        } else {
            format!(
                "Where you are: {}\n\n",
                tail_chars(ctx.description.trim(), MAX_OBSERVATION)
            )
        };
        let user = format!(
            "Goal: {}\n\nYour last commands: {history}\n\nWhat the game just said: {obs}\n\n\
             {place}You carry: {}\n\nCommands you can use now:\n{commands}\n\
             Which one command brings you closest to the goal? {answer}",
            ctx.objective.trim(),
            ctx.inventory.trim(),
        );
        vec![
            Message {
                role: "system".into(),
                content: self.system.clone(),
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
        let messages = self.prompt(ctx);
        let key = match self.key_by {
            RecordKey::Prompt => {
                let rendered: String = messages
                    .iter()
                    .map(|m| format!("{}\u{0}{}\u{0}", m.role, m.content))
                    .collect();
                xxh3_64(
                    format!(
                        "{}\u{1}{rendered}\u{1}{}",
                        self.name,
                        ctx.admissible.join("\n")
                    )
                    .as_bytes(),
                )
            }
            // The number of candidates is part of the key: a shortlist of another size is
            // another question, not a replay of this one with most candidates missing.
            RecordKey::History => xxh3_64(
                format!(
                    "{}\u{1}{}\u{1}{}\u{1}{}",
                    self.name,
                    ctx.episode,
                    ctx.history.join("\n"),
                    ctx.admissible.len()
                )
                .as_bytes(),
            ),
        };
        self.cost.calls += 1;
        if let Some(e) = self.recorded.get(&key) {
            let scores = match &e.actions {
                None if e.scores.len() == ctx.admissible.len() => Some(e.scores.clone()),
                None => None,
                Some(actions) => {
                    let found: Vec<Option<f32>> = ctx
                        .admissible
                        .iter()
                        .map(|a| actions.iter().position(|r| r == a).map(|i| e.scores[i]))
                        .collect();
                    if found.iter().all(Option::is_some) || self.model.is_none() {
                        // Without a model, a candidate worded differently this run (ScienceWorld
                        // renames objects at random) gets the step's lowest recorded score.
                        let floor = e.scores.iter().copied().fold(f32::INFINITY, f32::min);
                        Some(found.into_iter().map(|s| s.unwrap_or(floor)).collect())
                    } else {
                        None
                    }
                }
            };
            if let Some(scores) = scores {
                self.cost.replayed += 1;
                self.last_seconds = e.seconds;
                return Ok(Choice::from_scores(&scores));
            }
        }
        let Some(model) = &self.model else {
            let file = self
                .log
                .as_ref()
                .map_or("(none)".to_string(), |(p, _)| p.display().to_string());
            return Err(AgentError::Missing(format!(
                "episode {}, step {}: a state is not in the recording {file} of {} and no model \
                 is loaded to score it (run without --replay-only: the model scores it and the \
                 recording keeps it)",
                ctx.episode,
                ctx.history.len(),
                self.name
            )));
        };
        let t = Instant::now();
        let prompt = model.chat_prompt(&messages)?;
        let (cache, next, prompt_tokens) = model.prefill(&prompt)?;
        let end = model.tokenizer.eos.first().copied();
        let lettered = self.by_letter(ctx);
        let cands: Vec<Vec<u32>> = ctx
            .admissible
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let a = if lettered { LETTERS[i] } else { a.as_str() };
                let mut ids = model.tokenizer.encode(a)?;
                ids.extend(end);
                Ok(ids)
            })
            .collect::<Result<_, tandem_models::gguf::GgufError>>()?;
        let scores = model.score_continuations(&cache, &next, &cands)?;
        let seconds = t.elapsed().as_secs_f64();
        self.cost.seconds += seconds;
        self.last_seconds = seconds;
        self.cost.prompt_tokens += prompt_tokens as u64;
        self.cost.action_tokens += cands.iter().map(|c| c.len() as u64).sum::<u64>();
        // −∞ (a token outside the vocabulary) would poison the softmax; floor it.
        let scores: Vec<f32> = scores.into_iter().map(|s| s.max(-1e4)).collect();
        let actions = (self.key_by == RecordKey::History).then(|| ctx.admissible.to_vec());
        if let Some((path, f)) = &mut self.log {
            let line = serde_json::to_string(&Recorded {
                key: format!("{key:016x}"),
                scores: scores.clone(),
                actions: actions.clone(),
                seconds: Some(seconds),
            })
            .map_err(|e| AgentError::Env(e.to_string()))?;
            writeln!(f, "{line}").map_err(|e| AgentError::Io(path.clone(), e))?;
        }
        self.recorded.insert(
            key,
            Entry {
                scores: scores.clone(),
                actions,
                seconds,
            },
        );
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
